//! A delivery worker: takes one job (one message, one destination),
//! delivers it, turns each recipient's result into its next state (sent,
//! retry at a backed-off time, or bounced), builds any bounce or delay
//! notice and records it all in one queue transaction. Logs one line per
//! recipient and attempt, Postfix-style.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use crossbeam_channel::Receiver;

use super::backoff::{random_fraction, retry_delay};
use super::dsn::{self, NoticeKind, Problem};
use super::remote::{self, Envelope};
use super::{Attempt, DeliveryContext, Job, Route, Waker, maildir};
use crate::config::Config;
use crate::protocol::data::header_section_len;
use crate::queue::QueueError;
use crate::queue::delivery::{
    self, ClaimedRecipient, DeliveryReport, RecipientStatus, RecipientUpdate, StoredMessage,
};
use crate::timefmt::short_duration;

/// RFC 5321 6.3: a message that passed this many hosts is looping.
const MAX_HOPS: usize = 50;
/// After a worker fails internally, its recipients wait this long.
const FAILED_JOB_RETRY: Duration = Duration::from_secs(60);

pub fn run(jobs: Receiver<Job>, ctx: &DeliveryContext, in_flight: &AtomicUsize, waker: &Waker) {
    while let Ok(job) = jobs.recv() {
        let ids: Vec<i64> = job.recipients.iter().map(|r| r.id).collect();
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| deliver(ctx, &job)));
        let failure = match outcome {
            Ok(Ok(())) => None,
            Ok(Err(error)) => Some(error.to_string()),
            Err(_) => Some("delivery worker panicked".to_string()),
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
        in_flight.fetch_sub(1, Ordering::SeqCst);
        waker.wake();
    }
}

fn deliver(ctx: &DeliveryContext, job: &Job) -> Result<(), QueueError> {
    let Some(message) = ctx
        .reads
        .run(|conn| delivery::load_message(conn, &job.message_id))?
    else {
        // Deleted by an operator while it was being scheduled.
        log::info!("{}: no longer in the queue; skipped", job.message_id);
        return Ok(());
    };
    let hops = count_received(&message.content);
    let (attempts, relay) = if hops > MAX_HOPS {
        let reason = format!("554 5.4.6 Too many hops ({hops} Received headers): mail loop?");
        (vec![Attempt::Permanent(reason); job.recipients.len()], None)
    } else {
        match &job.route {
            Route::Local => (
                deliver_locally(ctx, &message, &job.recipients),
                Some("local".to_string()),
            ),
            route => {
                let envelope = Envelope {
                    sender: &message.sender,
                    recipients: job.recipients.iter().map(|r| r.address.as_str()).collect(),
                    content: &message.content,
                    eight_bit: message.eight_bit,
                    smtputf8: message.smtputf8,
                };
                let outcome = match route {
                    Route::Domain(domain) => remote::to_domain(ctx, domain, &envelope),
                    _ => remote::to_smarthost(ctx, &envelope),
                };
                (outcome.attempts, outcome.relay)
            }
        }
    };
    let report = settle(
        &ctx.config,
        &message,
        &job.recipients,
        attempts,
        relay.as_deref(),
        SystemTime::now(),
    );
    ctx.queue.record(report)
}

fn deliver_locally(
    ctx: &DeliveryContext,
    message: &StoredMessage,
    recipients: &[ClaimedRecipient],
) -> Vec<Attempt> {
    recipients
        .iter()
        .map(|recipient| match ctx.accounts.exists(&recipient.address) {
            Ok(false) => Attempt::Permanent(format!(
                "550 5.1.1 <{}>: no such mailbox here",
                recipient.address
            )),
            Err(error) => {
                Attempt::Temporary(format!("451 4.3.0 cannot look up the account: {error}"))
            }
            Ok(true) => match maildir::deliver(
                &ctx.config.data_dir,
                &ctx.config.hostname,
                &recipient.address,
                &message.sender,
                &message.content,
            ) {
                Ok(path) => Attempt::Delivered(format!(
                    "250 2.0.0 delivered to maildir ({})",
                    path.display()
                )),
                Err(error) => {
                    Attempt::Temporary(format!("451 4.3.0 cannot write to the Maildir: {error}"))
                }
            },
        })
        .collect()
}

fn count_received(content: &[u8]) -> usize {
    content[..header_section_len(content)]
        .split(|&b| b == b'\n')
        .filter(|line| line.len() >= 9 && line[..9].eq_ignore_ascii_case(b"received:"))
        .count()
}

/// Turns the attempts into queue updates and notices, and logs them.
pub fn settle(
    config: &Config,
    message: &StoredMessage,
    recipients: &[ClaimedRecipient],
    attempts: Vec<Attempt>,
    relay: Option<&str>,
    now: SystemTime,
) -> DeliveryReport {
    let queue = &config.queue;
    let age = now.duration_since(message.received_at).unwrap_or_default();
    let expires = message.received_at + queue.max_age.get();
    let mut updates = Vec::new();
    let mut failed = Vec::new();
    let mut delayed = Vec::new();
    for (recipient, attempt) in recipients.iter().zip(attempts) {
        let attempt_number = recipient.attempts + 1;
        let (status, reply, word) = match attempt {
            Attempt::Delivered(reply) => (RecipientStatus::Sent, reply, "sent"),
            Attempt::Permanent(reply) => {
                failed.push(problem(recipient, &reply, relay));
                (RecipientStatus::Bounced, reply, "bounced")
            }
            Attempt::Temporary(reply) if now >= expires => {
                let reply = format!("{reply} (gave up after {})", short_duration(age));
                failed.push(problem(recipient, &reply, relay));
                (RecipientStatus::Bounced, reply, "expired")
            }
            Attempt::Temporary(reply) => {
                let delay = retry_delay(
                    attempt_number,
                    queue.retry_min.get(),
                    queue.retry_max.get(),
                    random_fraction(),
                );
                // The last try happens at expiry, not a backoff later.
                let next_attempt = (now + delay).min(expires.max(now));
                delayed.push(problem(recipient, &reply, relay));
                (
                    RecipientStatus::Deferred { next_attempt },
                    reply,
                    "deferred",
                )
            }
        };
        let original = recipient
            .original
            .as_deref()
            .map(|o| format!(", orig_to=<{o}>"))
            .unwrap_or_default();
        log::info!(
            "{}: to=<{}>{original}, relay={}, delay={}, attempt={attempt_number}, status={word} ({})",
            message.id,
            recipient.address,
            relay.unwrap_or("none"),
            short_duration(age),
            reply
        );
        updates.push(RecipientUpdate {
            recipient_id: recipient.id,
            status,
            reply,
            relay: relay.map(str::to_string),
        });
    }

    let hostname = &config.hostname;
    let mut notices = Vec::new();
    if let Some(bounce) = dsn::notice(hostname, message, NoticeKind::Failed, &failed, now, None) {
        log::info!(
            "{}: sender non-delivery notification: {}",
            message.id,
            bounce.id
        );
        notices.push(bounce);
    }
    let warn_after = queue.delay_warning.get();
    let mut delay_warning_sent = false;
    if !warn_after.is_zero()
        && age >= warn_after
        && !message.delay_warning_sent
        && let Some(warning) = dsn::notice(
            hostname,
            message,
            NoticeKind::Delayed,
            &delayed,
            now,
            Some(expires),
        )
    {
        log::info!("{}: sender delay notification: {}", message.id, warning.id);
        notices.push(warning);
        delay_warning_sent = true;
    }
    DeliveryReport {
        message_id: message.id.clone(),
        updates,
        notices,
        delay_warning_sent,
    }
}

fn problem(recipient: &ClaimedRecipient, reply: &str, relay: Option<&str>) -> Problem {
    Problem {
        address: recipient.address.clone(),
        original: recipient.original.clone(),
        diagnostic: reply.to_string(),
        remote_mta: relay.filter(|r| *r != "local").map(str::to_string),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_received_headers_only_in_the_header_section() {
        let content =
            b"Received: a\r\nreceived: b\r\n\tfolded\r\nSubject: x\r\n\r\nReceived: in body\r\n";
        assert_eq!(count_received(content), 2);
    }
}
