//! The scheduler thread: sleeps until the next recipient is due or until
//! woken (new mail, a worker freed, an operator's retry), then claims what
//! is due and hands it out. Keeps a few jobs ready per worker, no more,
//! so little sits "delivering" in the channel while workers are busy.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};

use super::{DeliveryContext, Job, Route};
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
        let claimed = match self.context.queue.claim_due(free) {
            Ok(claimed) => claimed,
            Err(error) => {
                log::error!("scheduler: cannot claim due recipients: {error}");
                return CLAIM_RETRY * 5;
            }
        };
        if claimed.is_empty() {
            return CLAIM_RETRY;
        }
        for job in group(&self.context.config, claimed) {
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
/// share one SMTP transaction.
pub fn group(config: &crate::config::Config, claimed: Vec<ClaimedRecipient>) -> Vec<Job> {
    let mut jobs: Vec<Job> = Vec::new();
    let mut index: HashMap<(String, Route), usize> = HashMap::new();
    for recipient in claimed {
        let route = Route::for_address(config, &recipient.address);
        let key = (recipient.message_id.clone(), route.clone());
        match index.get(&key) {
            Some(&at) => jobs[at].recipients.push(recipient),
            None => {
                index.insert(key, jobs.len());
                jobs.push(Job {
                    message_id: recipient.message_id.clone(),
                    route,
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

    fn claimed(id: i64, message: &str, address: &str) -> ClaimedRecipient {
        ClaimedRecipient {
            id,
            message_id: message.into(),
            address: address.into(),
            original: None,
            attempts: 0,
        }
    }

    #[test]
    fn groups_per_message_and_destination() {
        let config = crate::config::Config::parse("[domains]\nlocal = [\"example.com\"]").unwrap();
        let jobs = group(
            &config,
            vec![
                claimed(1, "A", "x@example.org"),
                claimed(2, "A", "alice@example.com"),
                claimed(3, "A", "y@EXAMPLE.org"),
                claimed(4, "B", "z@example.org"),
                claimed(5, "A", "bob@example.com"),
                claimed(6, "A", "w@example.net"),
            ],
        );
        let summary: Vec<(String, Route, Vec<i64>)> = jobs
            .iter()
            .map(|j| {
                (
                    j.message_id.clone(),
                    j.route.clone(),
                    j.recipients.iter().map(|r| r.id).collect(),
                )
            })
            .collect();
        assert_eq!(
            summary,
            vec![
                ("A".into(), Route::Domain("example.org".into()), vec![1, 3]),
                ("A".into(), Route::Local, vec![2, 5]),
                ("B".into(), Route::Domain("example.org".into()), vec![4]),
                ("A".into(), Route::Domain("example.net".into()), vec![6]),
            ]
        );
    }

    #[test]
    fn smarthost_takes_all_non_local_mail() {
        let config = crate::config::Config::parse(
            "[domains]\nlocal = [\"example.com\"]\n[delivery]\nsmarthost = \"relay.example.net:587\"",
        )
        .unwrap();
        let jobs = group(
            &config,
            vec![
                claimed(1, "A", "x@example.org"),
                claimed(2, "A", "y@example.net"),
                claimed(3, "A", "a@example.com"),
            ],
        );
        assert_eq!(jobs.len(), 2);
        assert_eq!(jobs[0].route, Route::Smarthost);
        assert_eq!(jobs[0].recipients.len(), 2);
        assert_eq!(jobs[1].route, Route::Local);
    }
}
