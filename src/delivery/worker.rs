//! A delivery worker: takes one job (one message, one destination),
//! delivers it, turns each recipient's result into its next state (sent,
//! retry at a backed-off time, or bounced), builds any bounce or delay
//! notice and records it all in one queue transaction. Logs one line per
//! recipient and attempt, Postfix-style.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use crossbeam_channel::{Receiver, Sender};

use super::backoff::random_fraction;
use super::dsn::{self, NoticeKind, Problem};
use super::next_state::{NextState, RetryLimits, Tried, delay_warning_due, next_state};
use super::outcome::{self, Attempt, Stage};
use super::remote::{self, Outbound, RemoteRecipient};
use super::scheduler::Event;
use super::{DeliveryContext, Destination, Job, Reach, maildir};
use crate::config::Config;
use crate::envelope::{Recipient, Route};
use crate::printable::escape;
use crate::queue::NewMessage;
use crate::queue::content::ContentReader;
use crate::queue::delivery::{
    self, ClaimedRecipient, DeliveryReport, RecipientStatus, RecipientUpdate, StoredMessage,
};
use crate::routing;
use crate::store::StoreError;
use crate::timefmt::short_duration;

/// After a worker fails internally, its recipients wait this long.
const FAILED_JOB_RETRY: Duration = Duration::from_secs(60);

/// Takes jobs from one lane until it closes. After the stop, a job taken
/// is handed back unstarted: nothing new begins during the shutdown grace.
pub fn run(jobs: Receiver<Job>, ctx: &DeliveryContext, events: &Sender<Event>, stop: &AtomicBool) {
    while let Ok(job) = jobs.recv() {
        if stop.load(Ordering::SeqCst) {
            let _ = events.send(Event::Unstarted(job));
            continue;
        }
        let ids: Vec<i64> = job.recipients.iter().map(|r| r.id).collect();
        let started = std::time::Instant::now();
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| deliver(ctx, &job)));
        let (reach, failure) = match outcome {
            Ok(Ok(reach)) => (reach, None),
            Ok(Err(error)) => (Reach::Unknown, Some(error.to_string())),
            Err(_) => (Reach::Unknown, Some("delivery worker panicked".to_string())),
        };
        if let Some(why) = failure {
            log::error!(
                "{}: delivery failed internally ({why}); will retry",
                job.message_id
            );
            let retry_at = SystemTime::now() + FAILED_JOB_RETRY;
            if let Err(error) = ctx.queue.requeue_at(ids, retry_at) {
                log::error!(
                    "{}: cannot requeue ({error}); recovered at next start",
                    job.message_id
                );
            }
        }
        let _ = events.send(Event::Finished {
            destination: job.destination,
            reach,
            took: started.elapsed(),
            recipients: job.recipients.len(),
        });
    }
}

fn deliver(ctx: &DeliveryContext, job: &Job) -> Result<Reach, StoreError> {
    let Some(message) = ctx
        .reads
        .run(|conn| delivery::load_message(conn, &job.message_id, dsn::MAX_RETURNED_MESSAGE))?
    else {
        // Deleted by an operator while it was being scheduled.
        log::info!("{}: no longer in the queue; skipped", job.message_id);
        return Ok(Reach::Unknown);
    };
    let (attempts, relay, peer_reports, conn_use) = match &job.destination {
        Destination::Local => (
            deliver_locally(ctx, &message, &job.recipients),
            Some("local".to_string()),
            false,
            0,
        ),
        destination => {
            let envelope = Outbound {
                sender: &message.sender,
                recipients: job
                    .recipients
                    .iter()
                    .map(|r| RemoteRecipient {
                        address: &r.address,
                        notify: r.notify,
                        orcpt: r.orcpt.as_deref(),
                    })
                    .collect(),
                message: &message,
                size: message.size,
                eight_bit: message.eight_bit,
                smtputf8: message.smtputf8,
                ret: message.ret,
                envid: message.envid.as_deref(),
            };
            let outcome = match destination {
                Destination::Domain(domain) => remote::to_domain(ctx, domain, &envelope),
                _ => remote::to_smarthost(ctx, &envelope),
            };
            (
                outcome.attempts,
                outcome.relay,
                outcome.peer_reports,
                outcome.conn_use,
            )
        }
    };
    let reach = Reach::of(&attempts);
    // Recipient only when a notice is actually built (rarely).
    let route_sender = || routing::notice_route(&ctx.config, &ctx.accounts, &message.sender);
    let report = settle(
        &ctx.config,
        &message,
        &job.recipients,
        attempts,
        &Settlement {
            relay: relay.as_deref(),
            conn_use,
            peer_reports,
            route_sender: &route_sender,
        },
        SystemTime::now(),
    );
    ctx.queue.record(report)?;
    Ok(reach)
}

/// Writes the message into each recipient's Maildir. The mailbox was
/// decided when the message was accepted; it can only have gone away since.
fn deliver_locally(
    ctx: &DeliveryContext,
    message: &StoredMessage,
    recipients: &[ClaimedRecipient],
) -> Vec<Attempt> {
    recipients
        .iter()
        .map(|recipient| {
            let Route::Local { mailbox } = &recipient.route else {
                return Attempt::local(
                    outcome::MAILBOX_UNAVAILABLE,
                    Stage::Mailbox,
                    "not a local route (internal error)",
                );
            };
            match ctx.accounts.exists(mailbox) {
                Ok(false) => Attempt::local(
                    outcome::MAILBOX_GONE,
                    Stage::Mailbox,
                    format!("<{mailbox}>: the mailbox was removed after the message was accepted"),
                ),
                Err(error) => Attempt::local(
                    outcome::MAILBOX_UNAVAILABLE,
                    Stage::Mailbox,
                    format!("cannot look up the account: {error}"),
                ),
                Ok(true) => match maildir::deliver(
                    &ctx.config.data_dir,
                    &ctx.config.hostname,
                    mailbox,
                    &message.sender,
                    |file: &mut dyn std::io::Write| {
                        copy_content(ctx, message, |chunk| file.write_all(chunk))
                    },
                ) {
                    Ok(path) => Attempt::local(
                        outcome::DELIVERED_TO_MAILDIR,
                        Stage::Mailbox,
                        format!("delivered to maildir ({})", path.display()),
                    ),
                    Err(error) => Attempt::local(
                        outcome::MAILBOX_UNAVAILABLE,
                        Stage::Mailbox,
                        format!("cannot write to the Maildir: {error}"),
                    ),
                },
            }
        })
        .collect()
}

/// Passes a stored message through `sink`: straight from memory when the
/// head loaded with it is the whole message (almost every message), else
/// read from the queue a chunk at a time.
pub fn copy_content(
    ctx: &DeliveryContext,
    message: &StoredMessage,
    mut sink: impl FnMut(&[u8]) -> std::io::Result<()>,
) -> std::io::Result<()> {
    if message.head.len() as u64 == message.size {
        return sink(&message.head);
    }
    ContentReader::new(&message.id)
        .copy_to(&ctx.reads, sink)
        .map_err(|e| std::io::Error::other(e.to_string()))
}

/// How an attempt went, beyond the per-recipient results.
pub struct Settlement<'a> {
    /// host[ip]:port, or "local".
    pub relay: Option<&'a str>,
    /// Messages the connection carried, this one included.
    pub conn_use: usize,
    /// The next hop took the DSN requests along (RFC 3461), so success
    /// reports are its job now.
    pub peer_reports: bool,
    /// Where notices to the sender go (asked only when one is sent).
    pub route_sender: &'a dyn Fn() -> Vec<Recipient>,
}

/// Turns the attempts into queue updates and notices, and logs them.
pub fn settle(
    config: &Config,
    message: &StoredMessage,
    recipients: &[ClaimedRecipient],
    attempts: Vec<Attempt>,
    how: &Settlement,
    now: SystemTime,
) -> DeliveryReport {
    let limits = RetryLimits::of(&config.queue);
    let relay = how.relay;
    let age = now.duration_since(message.received_at).unwrap_or_default();
    let mut updates = Vec::new();
    let mut problems = Problems::default();
    for (recipient, attempt) in recipients.iter().zip(attempts) {
        let tried = Tried {
            verdict: attempt.verdict,
            earlier_attempts: recipient.attempts,
            notify: recipient.notify(),
            relayed: relay != Some("local"),
            peer_reports: how.peer_reports,
        };
        let state = next_state(tried, message.received_at, now, limits, random_fraction());
        let mut reply = attempt.to_string();
        if let NextState::Expired { .. } = state {
            reply = format!("{reply} (gave up after {})", short_duration(age));
        }
        problems.note(state, recipient, &attempt, &reply, relay);
        log_attempt(message, recipient, how, age, state.word(), &reply);
        updates.push(RecipientUpdate {
            recipient_id: recipient.id,
            status: match state {
                NextState::Done { .. } => RecipientStatus::Sent,
                NextState::Retry { at, .. } => RecipientStatus::Deferred { next_attempt: at },
                NextState::Bounce { .. } | NextState::Expired { .. } => RecipientStatus::Bounced,
            },
            reply,
            reply_status: attempt.status.clone(),
            relay: relay.map(str::to_string),
        });
    }
    let (notices, delay_warning_sent) = problems.notices(config, message, how, limits, now);
    DeliveryReport {
        message_id: message.id.clone(),
        updates,
        notices,
        delay_warning_sent,
    }
}

/// One line per recipient and attempt, Postfix-style.
fn log_attempt(
    message: &StoredMessage,
    recipient: &ClaimedRecipient,
    how: &Settlement,
    age: Duration,
    word: &str,
    reply: &str,
) {
    let original = recipient
        .original
        .as_deref()
        .map(|o| format!(", orig_to=<{}>", escape(o)))
        .unwrap_or_default();
    // As Postfix: said only of a connection that was reused.
    let conn_use = match how.conn_use {
        0 | 1 => String::new(),
        uses => format!(", conn_use={uses}"),
    };
    log::info!(
        "{}: to=<{}>{original}, relay={}{conn_use}, delay={}, attempt={}, status={word} ({})",
        message.id,
        escape(&recipient.address),
        escape(how.relay.unwrap_or("none")),
        short_duration(age),
        recipient.attempts + 1,
        escape(reply)
    );
}

/// What the sender may hear of, gathered from a job's recipients.
#[derive(Default)]
struct Problems {
    failed: Vec<Problem>,
    delayed: Vec<Problem>,
    succeeded: Vec<Problem>,
}

impl Problems {
    fn note(
        &mut self,
        state: NextState,
        recipient: &ClaimedRecipient,
        attempt: &Attempt,
        reply: &str,
        relay: Option<&str>,
    ) {
        match state {
            NextState::Done { report: true } => {
                let relayed = relay != Some("local");
                // The sender learns that it arrived, not where our
                // Maildirs are on disk.
                let diagnostic = if relayed {
                    reply.to_string()
                } else {
                    format!(
                        "{} {} delivered to the mailbox",
                        attempt.code, attempt.status
                    )
                };
                let mut problem = problem(recipient, attempt, &diagnostic, relay);
                problem.relayed = relayed;
                self.succeeded.push(problem);
            }
            NextState::Bounce { notify: true } | NextState::Expired { notify: true } => {
                self.failed.push(problem(recipient, attempt, reply, relay));
            }
            NextState::Retry { warn: true, .. } => {
                self.delayed.push(problem(recipient, attempt, reply, relay));
            }
            _ => {}
        }
    }

    /// The notices to queue for the sender, and whether one is the delay
    /// warning.
    fn notices(
        &self,
        config: &Config,
        message: &StoredMessage,
        how: &Settlement,
        limits: RetryLimits,
        now: SystemTime,
    ) -> (Vec<NewMessage>, bool) {
        let mut notices = Vec::new();
        let sender_route = std::cell::OnceCell::new();
        let notice = |kind, problems: &[Problem], until| {
            if problems.is_empty() || !dsn::may_notify(message) {
                return None;
            }
            let to = sender_route.get_or_init(|| (how.route_sender)()).clone();
            dsn::notice(&config.hostname, message, kind, problems, to, now, until)
        };
        if let Some(bounce) = notice(NoticeKind::Failed, &self.failed, None) {
            log::info!(
                "{}: sender non-delivery notification: {}",
                message.id,
                bounce.id
            );
            notices.push(bounce);
        }
        if let Some(report) = notice(NoticeKind::Success, &self.succeeded, None) {
            log::info!(
                "{}: sender delivery status notification: {}",
                message.id,
                report.id
            );
            notices.push(report);
        }
        let waited = now.duration_since(message.received_at).unwrap_or_default();
        let expires = message.received_at + limits.max_age;
        let mut delay_warning_sent = false;
        if delay_warning_due(
            limits,
            waited,
            message.delay_warning_sent,
            !self.delayed.is_empty(),
        ) && let Some(warning) = notice(NoticeKind::Delayed, &self.delayed, Some(expires))
        {
            log::info!("{}: sender delay notification: {}", message.id, warning.id);
            notices.push(warning);
            delay_warning_sent = true;
        }
        (notices, delay_warning_sent)
    }
}

fn problem(
    recipient: &ClaimedRecipient,
    attempt: &Attempt,
    diagnostic: &str,
    relay: Option<&str>,
) -> Problem {
    Problem {
        address: recipient.address.clone(),
        original: dsn::original_recipient(
            recipient.orcpt.as_deref(),
            recipient.original.as_deref(),
        ),
        diagnostic: diagnostic.to_string(),
        status: attempt.status.clone(),
        remote_mta: relay.filter(|_| attempt.remote).map(str::to_string),
        relayed: false,
    }
}
