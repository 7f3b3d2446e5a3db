//! What becomes of a recipient after an attempt, and of its destination
//! and its sender: decided here as pure functions of the facts (the
//! verdict, the counts, the clock, the limits), acted on by the worker and
//! the scheduler. One table test walks every branch.

use std::time::{Duration, SystemTime};

use super::Reach;
use super::backoff::retry_delay;
use super::outcome::Verdict;
use crate::config::QueueConfig;
use crate::protocol::dsn::Notify;

/// The queue's retry and expiry settings, as the decisions need them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryLimits {
    pub retry_min: Duration,
    pub retry_max: Duration,
    /// Mail older than this is not tried again: it bounces.
    pub max_age: Duration,
    /// A delay warning goes out once mail has waited this long; zero: never.
    pub delay_warning: Duration,
}

impl RetryLimits {
    pub fn of(queue: &QueueConfig) -> RetryLimits {
        RetryLimits {
            retry_min: queue.retry_min.get(),
            retry_max: queue.retry_max.get(),
            max_age: queue.max_age.get(),
            delay_warning: queue.delay_warning.get(),
        }
    }
}

/// The facts about one recipient's attempt that its next state depends on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tried {
    pub verdict: Verdict,
    /// Attempts before this one.
    pub earlier_attempts: u32,
    pub notify: Notify,
    /// Handed to another server (not a local Maildir).
    pub relayed: bool,
    /// That server took the DSN requests along (RFC 3461): success reports
    /// are its job now.
    pub peer_reports: bool,
}

/// A recipient's next state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NextState {
    /// Delivered. `report`: the sender asked to hear of it.
    Done { report: bool },
    /// Tried again at `at`. `warn`: its delay may go in a delay warning.
    Retry { at: SystemTime, warn: bool },
    /// Refused for good. `notify`: the sender gets a bounce.
    Bounce { notify: bool },
    /// Still failing when the message reached `max_age`: given up, as a
    /// bounce.
    Expired { notify: bool },
}

impl NextState {
    /// The word the log line uses.
    pub fn word(self) -> &'static str {
        match self {
            NextState::Done { .. } => "sent",
            NextState::Retry { .. } => "deferred",
            NextState::Bounce { .. } => "bounced",
            NextState::Expired { .. } => "expired",
        }
    }
}

/// The next state of a recipient whose message was received at
/// `received_at` and tried at `now`. `jitter` in [0, 1) spreads retries
/// (see [`retry_delay`]).
pub fn next_state(
    tried: Tried,
    received_at: SystemTime,
    now: SystemTime,
    limits: RetryLimits,
    jitter: f64,
) -> NextState {
    let expires = received_at + limits.max_age;
    match tried.verdict {
        Verdict::Delivered => NextState::Done {
            report: tried.notify.success && !(tried.relayed && tried.peer_reports),
        },
        Verdict::Permanent => NextState::Bounce {
            notify: tried.notify.failure,
        },
        Verdict::Temporary if now >= expires => NextState::Expired {
            notify: tried.notify.failure,
        },
        Verdict::Temporary => {
            let delay = retry_delay(
                tried.earlier_attempts.saturating_add(1),
                limits.retry_min,
                limits.retry_max,
                jitter,
            );
            // The last try happens at expiry, not a backoff later.
            NextState::Retry {
                at: (now + delay).min(expires.max(now)),
                warn: tried.notify.delay,
            }
        }
    }
}

/// Whether the sender is told now that the message is delayed: once, after
/// `delay_warning`, and only when some recipient's delay may be reported.
pub fn delay_warning_due(
    limits: RetryLimits,
    waited: Duration,
    already_sent: bool,
    any_to_report: bool,
) -> bool {
    !limits.delay_warning.is_zero()
        && waited >= limits.delay_warning
        && !already_sent
        && any_to_report
}

/// Whether the destination as a whole waits `retry_min` (its queued
/// recipients with it) rather than each recipient on its own schedule.
pub fn backs_off_destination(reach: Reach) -> bool {
    reach == Reach::Unreachable
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINUTE: Duration = Duration::from_secs(60);
    const HOUR: Duration = Duration::from_secs(3600);

    fn limits() -> RetryLimits {
        RetryLimits {
            retry_min: 5 * MINUTE,
            retry_max: HOUR,
            max_age: 24 * HOUR,
            delay_warning: 4 * HOUR,
        }
    }

    fn tried(verdict: Verdict) -> Tried {
        Tried {
            verdict,
            earlier_attempts: 0,
            notify: Notify::DEFAULT,
            relayed: true,
            peer_reports: false,
        }
    }

    const NEVER: Notify = Notify {
        success: false,
        failure: false,
        delay: false,
    };
    const ALL: Notify = Notify {
        success: true,
        failure: true,
        delay: true,
    };

    #[test]
    fn every_branch_of_a_recipients_next_state() {
        let received = SystemTime::UNIX_EPOCH + 1000 * HOUR;
        let at = |age: Duration| received + age;
        let delivered = tried(Verdict::Delivered);
        let temporary = tried(Verdict::Temporary);
        let permanent = tried(Verdict::Permanent);
        #[rustfmt::skip]
        let table: Vec<(&str, Tried, Duration, NextState)> = vec![
            ("delivered, no report asked", delivered, MINUTE,
             NextState::Done { report: false }),
            ("delivered, NOTIFY=SUCCESS", Tried { notify: ALL, ..delivered }, MINUTE,
             NextState::Done { report: true }),
            ("delivered to a peer that reports itself", Tried { notify: ALL, peer_reports: true, ..delivered }, MINUTE,
             NextState::Done { report: false }),
            ("delivered locally: we report, whatever peers do", Tried { notify: ALL, relayed: false, peer_reports: true, ..delivered }, MINUTE,
             NextState::Done { report: true }),
            ("refused for good", permanent, MINUTE,
             NextState::Bounce { notify: true }),
            ("refused for good, NOTIFY=NEVER", Tried { notify: NEVER, ..permanent }, MINUTE,
             NextState::Bounce { notify: false }),
            ("first temporary failure: retry_min", temporary, MINUTE,
             NextState::Retry { at: at(MINUTE + 5 * MINUTE), warn: true }),
            ("third temporary failure: doubled twice", Tried { earlier_attempts: 2, ..temporary }, MINUTE,
             NextState::Retry { at: at(MINUTE + 20 * MINUTE), warn: true }),
            ("many failures: retry_max", Tried { earlier_attempts: 40, ..temporary }, MINUTE,
             NextState::Retry { at: at(MINUTE + HOUR), warn: true }),
            ("NOTIFY without DELAY", Tried { notify: NEVER, ..temporary }, MINUTE,
             NextState::Retry { at: at(MINUTE + 5 * MINUTE), warn: false }),
            ("the last retry falls at expiry, not after", Tried { earlier_attempts: 40, ..temporary }, 23 * HOUR + 30 * MINUTE,
             NextState::Retry { at: at(24 * HOUR), warn: true }),
            ("failing at max_age: given up", temporary, 24 * HOUR,
             NextState::Expired { notify: true }),
            ("failing past max_age, NOTIFY=NEVER", Tried { notify: NEVER, ..temporary }, 30 * HOUR,
             NextState::Expired { notify: false }),
            ("delivered past max_age is still delivered", delivered, 30 * HOUR,
             NextState::Done { report: false }),
        ];
        for (case, tried, age, expected) in table {
            // jitter 0.5: the factor is exactly 1.
            let state = next_state(tried, received, at(age), limits(), 0.5);
            assert_eq!(state, expected, "{case}");
        }
    }

    #[test]
    fn when_the_sender_hears_of_a_delay() {
        #[rustfmt::skip]
        let table = [
            ("not waited long enough", limits(), 3 * HOUR, false, true, false),
            ("waited delay_warning", limits(), 4 * HOUR, false, true, true),
            ("already told", limits(), 5 * HOUR, true, true, false),
            ("no recipient's delay may be reported", limits(), 5 * HOUR, false, false, false),
            ("warnings off", RetryLimits { delay_warning: Duration::ZERO, ..limits() }, 5 * HOUR, false, true, false),
        ];
        for (case, limits, waited, sent, any, expected) in table {
            assert_eq!(
                delay_warning_due(limits, waited, sent, any),
                expected,
                "{case}"
            );
        }
    }

    #[test]
    fn only_an_unreachable_destination_is_backed_off_as_a_whole() {
        assert!(backs_off_destination(Reach::Unreachable));
        assert!(!backs_off_destination(Reach::Reached));
        assert!(!backs_off_destination(Reach::Unknown));
    }
}
