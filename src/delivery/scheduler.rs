//! The scheduler thread: sleeps until the next recipient is due or until
//! woken (new mail, a worker freed, an operator's retry), then claims what
//! is due and hands it out. Keeps a few jobs ready per worker, no more,
//! so little sits "delivering" in the channel while workers are busy.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};

use super::{DeliveryContext, Destination, Job};
use crate::queue::delivery::{self, ClaimedRecipient};

/// Longest sleep without a reason: a safety net for changes made while no
/// control socket could tell us (it is one indexed query, not polling work).
const IDLE_RESCAN: Duration = Duration::from_secs(60);
/// Jobs kept ready per worker, so no worker waits for the scheduler's next
/// claim; few enough that a crash has little to redo.
const JOBS_PER_WORKER: usize = 8;
/// When something is due but nothing could be claimed (another process
/// holds it), wait this long rather than spin.
const CLAIM_RETRY: Duration = Duration::from_secs(1);

pub struct Scheduler {
    pub context: Arc<DeliveryContext>,
    pub jobs: Sender<Job>,
    pub wake: Receiver<()>,
    pub stop: Arc<AtomicBool>,
    pub in_flight: Arc<AtomicUsize>,
    pub capacity: usize,
}

impl Scheduler {
    pub fn run(self) {
        while !self.stop.load(Ordering::SeqCst) {
            let wait = self.tick();
            match self.wake.recv_timeout(wait) {
                Ok(()) | Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
        }
    }

    /// Claims and dispatches what is due; returns how long to sleep.
    fn tick(&self) -> Duration {
        let next_due = match self.context.reads.run(delivery::next_due) {
            Ok(next) => next,
            Err(error) => {
                log::error!("scheduler: {error}");
                return CLAIM_RETRY * 5;
            }
        };
        let now = SystemTime::now();
        let Some(due_at) = next_due else {
            return IDLE_RESCAN;
        };
        if let Ok(wait) = due_at.duration_since(now)
            && !wait.is_zero()
        {
            return wait.min(IDLE_RESCAN);
        }
        let budget = self.capacity * JOBS_PER_WORKER;
        let free = budget.saturating_sub(self.in_flight.load(Ordering::SeqCst));
        // Refill in batches (each claim is a commit), before workers run dry.
        if free < budget / 2 {
            // A worker finishing wakes us.
            return IDLE_RESCAN;
        }
        let claimed = match self.context.queue.claim_due(free, Vec::new()) {
            Ok(claimed) => claimed,
            Err(error) => {
                log::error!("scheduler: cannot claim due recipients: {error}");
                return CLAIM_RETRY * 5;
            }
        };
        if claimed.is_empty() {
            return CLAIM_RETRY;
        }
        for job in group(claimed) {
            self.in_flight.fetch_add(1, Ordering::SeqCst);
            if self.jobs.send(job).is_err() {
                self.in_flight.fetch_sub(1, Ordering::SeqCst);
            }
        }
        // More may be due; look again at once.
        Duration::ZERO
    }
}

/// One job per message and destination, so recipients at the same domain
/// share one SMTP transaction. Destinations come from the routes stored
/// when the message was accepted.
pub fn group(claimed: Vec<ClaimedRecipient>) -> Vec<Job> {
    let mut jobs: Vec<Job> = Vec::new();
    let mut index: HashMap<(String, Destination), usize> = HashMap::new();
    for recipient in claimed {
        let destination = Destination::of(&recipient.route);
        let key = (recipient.message_id.clone(), destination.clone());
        match index.get(&key) {
            Some(&at) => jobs[at].recipients.push(recipient),
            None => {
                index.insert(key, jobs.len());
                jobs.push(Job {
                    message_id: recipient.message_id.clone(),
                    destination,
                    recipients: vec![recipient],
                });
            }
        }
    }
    jobs
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::Route;

    fn claimed(id: i64, message: &str, route: Route) -> ClaimedRecipient {
        ClaimedRecipient {
            id,
            message_id: message.into(),
            address: format!("r{id}@example"),
            original: None,
            attempts: 0,
            route,
            notify: None,
            orcpt: None,
            last_reply: None,
            last_status: None,
        }
    }

    fn mx(domain: &str) -> Route {
        Route::Remote {
            domain: domain.into(),
        }
    }

    fn local(mailbox: &str) -> Route {
        Route::Local {
            mailbox: mailbox.into(),
        }
    }

    #[test]
    fn groups_per_message_and_destination() {
        let jobs = group(vec![
            claimed(1, "A", mx("example.org")),
            claimed(2, "A", local("alice@example.com")),
            claimed(3, "A", mx("example.org")),
            claimed(4, "B", mx("example.org")),
            claimed(5, "A", local("bob@example.com")),
            claimed(6, "A", mx("example.net")),
            claimed(7, "A", Route::SmartHost),
        ]);
        let summary: Vec<(String, Destination, Vec<i64>)> = jobs
            .iter()
            .map(|j| {
                (
                    j.message_id.clone(),
                    j.destination.clone(),
                    j.recipients.iter().map(|r| r.id).collect(),
                )
            })
            .collect();
        assert_eq!(
            summary,
            vec![
                (
                    "A".into(),
                    Destination::Domain("example.org".into()),
                    vec![1, 3]
                ),
                ("A".into(), Destination::Local, vec![2, 5]),
                (
                    "B".into(),
                    Destination::Domain("example.org".into()),
                    vec![4]
                ),
                (
                    "A".into(),
                    Destination::Domain("example.net".into()),
                    vec![6]
                ),
                ("A".into(), Destination::SmartHost, vec![7]),
            ]
        );
    }
}
