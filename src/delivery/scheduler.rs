//! The scheduler thread: sleeps until the next recipient is due or until
//! woken (new mail, a job finished, an operator's retry), then claims what
//! is due and hands it out, fairly:
//! - local Maildir deliveries go to a lane of their own, so local mail
//!   never waits behind remote hosts;
//! - each remote destination (a domain's MX hosts, or the smart host) has
//!   a window of jobs that may run at once: it starts small, grows by one
//!   per delivery that reaches the destination, up to
//!   `delivery.destination_concurrency`, and falls to one when the
//!   destination cannot be reached. Claims pass over destinations whose
//!   window is full, so one dead domain never holds every worker;
//! - a destination that cannot be reached is backed off as a whole: its
//!   waiting recipients are put back by `queue.retry_min` in one indexed
//!   update and its window stays at one, so the next try is one probe,
//!   not one connection per recipient;
//! - a destination whose attempt took as long as a whole reply timeout
//!   (a host that stalls or trickles) is *slow* for a while: the jobs of
//!   slow destinations together hold at most half the remote workers, so
//!   however many of them there are, the others always find a worker.
//!
//! At shutdown, jobs no worker has started go back to the queue untouched
//! (same attempts, same due time): nothing runs after the stop, so
//! nothing is delivered twice.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use crossbeam_channel::{Receiver, Sender, select};

use super::next_state::backs_off_destination;
use super::{DeliveryContext, Destination, Job, News, Reach};
use crate::queue::delivery::{self, ClaimLimits, ClaimedRecipient};

/// Longest sleep without a reason: a safety net for changes made while no
/// control socket could tell us (it is one indexed query, not polling work).
const IDLE_RESCAN: Duration = Duration::from_secs(60);
/// Jobs kept claimed per worker, so no worker waits for the scheduler's
/// next claim; few enough that a crash has little to redo.
const JOBS_PER_WORKER: usize = 8;
/// When something is due but nothing could be claimed (another process
/// holds it, or only busy destinations have due mail), wait this long.
/// Also how often a claim passes over the destinations known to have a
/// backlog, so mail for others queued behind it is found.
const CLAIM_RETRY: Duration = Duration::from_secs(1);
/// Claims for new mail come at most this often: under a steady stream of
/// mail each claim takes a batch, rather than one commit per message.
const MIN_CLAIM_INTERVAL: Duration = Duration::from_millis(10);
/// ... and at most this share of the time goes to them: such a claim
/// walks past the due mail of destinations without room (10,000 messages
/// for a dead domain cost about 15 ms), in the queue's one writer.
const DISCOVERY_SHARE: u32 = 4;
/// A destination's window when it is first seen (Postfix starts at 5).
const INITIAL_WINDOW: usize = 4;
/// An attempt taking this long (at most; or one `delivery.reply_timeout`)
/// makes its destination slow ...
const SLOW_ATTEMPT: Duration = Duration::from_secs(60);
/// ... for this long, unless it answers promptly again.
const SLOW_FOR: Duration = Duration::from_secs(3600);

/// What a worker tells the scheduler.
pub enum Event {
    /// A job ended; what it showed about its destination.
    Finished {
        destination: Destination,
        reach: Reach,
        /// How long the attempt took.
        took: Duration,
        /// The job's recipients (deferred with it when it failed).
        recipients: usize,
    },
    /// Taken from a lane after the stop: not started, goes back untouched.
    Unstarted(Job),
}

/// The two kinds of workers.
pub struct Lanes {
    pub local: Sender<Job>,
    pub remote: Sender<Job>,
}

#[derive(Default)]
struct DestinationState {
    running: usize,
    window: usize,
    /// Claimed while the window was full.
    waiting: VecDeque<Job>,
    /// The last claim filled this destination's room (or passed it
    /// over): more of its mail may be due in the queue.
    more_due: bool,
    /// Unreachable: its window stays at 1 until then (the queue holds its
    /// waiting recipients back; new mail and an operator's retry still
    /// go, one at a time).
    backed_off_until: Option<Instant>,
    /// Slow until then: its jobs count against the slow share.
    slow_until: Option<Instant>,
    /// Of `running`, the jobs started while it was slow.
    running_slow: usize,
}

pub struct Scheduler {
    pub context: Arc<DeliveryContext>,
    pub lanes: Lanes,
    /// The lanes' receiving ends, to take back what no worker started.
    pub lane_receivers: (Receiver<Job>, Receiver<Job>),
    pub events: Receiver<Event>,
    pub wake: Receiver<()>,
    /// What the wakes were about.
    news: Arc<Mutex<News>>,
    pub stop: Arc<AtomicBool>,
    /// Jobs claimed and not finished, at most.
    pub budget: usize,
    destinations: HashMap<Destination, DestinationState>,
    outstanding: usize,
    /// Woken (new mail, an operator) or a due time reached: claim soon.
    fresh: bool,
    /// The last claim stopped at its row limit with room left: claim
    /// again when workers free up.
    backlog: bool,
    /// When the last claim for new mail may be followed by the next.
    next_discovery: Instant,
    /// Jobs of slow destinations running (or in the remote lane) ...
    slow_running: usize,
    /// ... and the most there may be.
    slow_share: usize,
}

impl DestinationState {
    /// Jobs this destination may still take: what runs plus one window
    /// waiting. More would tie up the claim budget behind one destination
    /// (a dead one holds its jobs for minutes) and starve the others.
    fn room(&self) -> usize {
        (2 * self.window).saturating_sub(self.running + self.waiting.len())
    }

    /// Worth a claim of its own: a window's worth of room and mail due.
    fn wants_refill(&self) -> bool {
        self.more_due && self.room() >= self.window
    }

    fn is_slow(&self, now: Instant) -> bool {
        self.slow_until.is_some_and(|until| until > now)
    }
}

/// What the scheduler leaves behind when it stops.
pub struct Stopped {
    pub events: Receiver<Event>,
}

impl Scheduler {
    pub fn new(
        context: Arc<DeliveryContext>,
        lanes: Lanes,
        lane_receivers: (Receiver<Job>, Receiver<Job>),
        events: Receiver<Event>,
        wake: Receiver<()>,
        news: Arc<Mutex<News>>,
        stop: Arc<AtomicBool>,
    ) -> Scheduler {
        let workers = context.config.delivery.workers + context.config.delivery.local_workers;
        let slow_share = (context.config.delivery.workers / 2).max(1);
        Scheduler {
            context,
            lanes,
            lane_receivers,
            events,
            wake,
            news,
            stop,
            budget: workers * JOBS_PER_WORKER,
            destinations: HashMap::new(),
            outstanding: 0,
            fresh: true,
            backlog: false,
            next_discovery: Instant::now(),
            slow_running: 0,
            slow_share,
        }
    }

    pub fn run(mut self) -> Stopped {
        while !self.stop.load(Ordering::SeqCst) {
            let wait = self.tick();
            let events = self.events.clone();
            let wake = self.wake.clone();
            select! {
                recv(events) -> event => match event {
                    Ok(event) => self.handle(event),
                    Err(_) => break,
                },
                recv(wake) -> woken => {
                    if woken.is_err() {
                        break;
                    }
                    self.hear(News::take(&self.news));
                }
                default(wait) => self.fresh = true,
            }
            // Everything else that finished meanwhile, before claiming.
            while let Ok(event) = self.events.try_recv() {
                self.handle(event);
            }
        }
        self.give_back_unstarted();
        Stopped {
            events: self.events,
        }
    }

    /// A discovery is needed for anything but new mail to destinations
    /// with a backlog: a discovery would pass over those anyway, and their
    /// refills read their mail in order. Under a steady stream to one busy
    /// destination, discoveries that found nothing took a quarter of the
    /// queue writer's time.
    fn hear(&mut self, news: News) {
        if needs_discovery(&news, &self.destinations) {
            self.fresh = true;
        }
    }

    /// Claims and dispatches what is due; returns how long to sleep.
    /// A claim is a write, so it runs only when it can take something:
    /// - a refill, when a destination with a backlog has a window's worth
    ///   of room: read from that destination's part of the index, cheap
    ///   whatever else waits;
    /// - a discovery, for new mail or a due time: a walk over what is due
    ///   for all the other destinations, earliest first, at most every
    ///   [`MIN_CLAIM_INTERVAL`] and with at most 1/[`DISCOVERY_SHARE`] of
    ///   the time, or when half the budget is free and the last walk
    ///   stopped at its limit.
    fn tick(&mut self) -> Duration {
        self.forget_idle();
        let free = self.budget.saturating_sub(self.outstanding);
        if free == 0 {
            // A job finishing wakes us.
            return IDLE_RESCAN;
        }
        let refills: Vec<String> = self
            .destinations
            .iter()
            .filter(|(_, state)| state.wants_refill())
            .map(|(destination, _)| destination.key())
            .collect();
        let mut recipients = Vec::new();
        if !refills.is_empty() {
            match self.claim(free, refills) {
                Ok(claimed) => recipients = claimed,
                Err(()) => return CLAIM_RETRY * 5,
            }
        }
        let discover = self.fresh || (self.backlog && free >= self.budget / 2);
        let wait = if !discover {
            CLAIM_RETRY
        } else if let Some(wait) = self.next_discovery.checked_duration_since(Instant::now()) {
            wait
        } else {
            self.discover(free.saturating_sub(recipients.len()), &mut recipients)
        };
        self.dispatch_claimed(recipients);
        if self
            .destinations
            .values()
            .any(DestinationState::wants_refill)
        {
            Duration::ZERO
        } else {
            wait
        }
    }

    /// A walk over what is due, passing over destinations with a backlog
    /// (refills serve them). Returns how long to sleep.
    fn discover(&mut self, free: usize, recipients: &mut Vec<ClaimedRecipient>) -> Duration {
        // Look (a read) before claiming (a write).
        match self.context.reads.run(delivery::next_due) {
            Ok(None) => {
                self.fresh = false;
                return IDLE_RESCAN;
            }
            Ok(Some(due_at)) => {
                if let Ok(wait) = due_at.duration_since(SystemTime::now())
                    && !wait.is_zero()
                {
                    self.fresh = false;
                    return wait.min(IDLE_RESCAN);
                }
            }
            Err(error) => {
                log::error!("scheduler: {error}");
                return CLAIM_RETRY * 5;
            }
        }
        if free == 0 {
            return CLAIM_RETRY;
        }
        self.fresh = false;
        let started = Instant::now();
        match self.claim(free, Vec::new()) {
            Ok(found) => recipients.extend(found),
            Err(()) => return CLAIM_RETRY * 5,
        }
        let took = started.elapsed();
        self.next_discovery = Instant::now() + (took * DISCOVERY_SHARE).max(MIN_CLAIM_INTERVAL);
        CLAIM_RETRY
    }

    /// Hands claimed jobs to their destinations' queues and starts what
    /// the windows allow.
    fn dispatch_claimed(&mut self, recipients: Vec<ClaimedRecipient>) {
        let mut surplus = Vec::new();
        for job in group(recipients) {
            let state = self.state_of(&job.destination);
            // The claim kept to the room; recipients of a message taken
            // for another destination may still overshoot it.
            if state.room() == 0 {
                surplus.push(job);
                continue;
            }
            state.waiting.push_back(job);
            self.outstanding += 1;
        }
        if !surplus.is_empty() {
            self.requeue_untouched(surplus);
        }
        let keys: Vec<Destination> = self.destinations.keys().cloned().collect();
        for destination in keys {
            self.dispatch(&destination);
        }
    }

    /// A refill for `only` these destinations, or (empty) a discovery.
    fn claim(&mut self, free: usize, only: Vec<String>) -> Result<Vec<ClaimedRecipient>, ()> {
        let refill = !only.is_empty();
        let mut limits = self.claim_limits(free, refill);
        limits.only = only;
        let claimed = match self.context.queue.claim_due(limits.clone()) {
            Ok(claimed) => claimed,
            Err(error) => {
                log::error!("scheduler: cannot claim due recipients: {error}");
                return Err(());
            }
        };
        self.note_backlogs(&limits, &claimed.filled);
        if !refill {
            self.backlog = claimed.filled.is_empty() && claimed.walked == limits.rows;
        }
        Ok(claimed.recipients)
    }

    fn state_of(&mut self, destination: &Destination) -> &mut DestinationState {
        let window = self.window_for(destination);
        let state = self.destinations.entry(destination.clone()).or_default();
        if state.window == 0 {
            state.window = window;
        }
        state
    }

    /// Each known destination's room. A discovery passes over those with
    /// a backlog: refills serve them, and walking past their due mail
    /// would hide what is queued behind it.
    fn claim_limits(&mut self, rows: usize, refill: bool) -> ClaimLimits {
        let mut room: Vec<(String, usize)> = self
            .destinations
            .iter()
            .map(|(destination, state)| {
                let room = if !refill && state.more_due {
                    0
                } else {
                    state.room()
                };
                (destination.key(), room)
            })
            .collect();
        if !self.destinations.contains_key(&Destination::Local) {
            let window = self.window_for(&Destination::Local);
            room.push((Destination::Local.key(), 2 * window));
        }
        let default_window = self.window_for(&Destination::SmartHost);
        ClaimLimits {
            rows,
            room,
            default_room: 2 * default_window,
            only: Vec::new(),
        }
    }

    /// Which destinations may have more due: those whose room a claim
    /// filled or that it passed over; not those it read to the end.
    fn note_backlogs(&mut self, limits: &ClaimLimits, filled: &[String]) {
        for (destination, state) in self.destinations.iter_mut() {
            let key = destination.key();
            let read = if limits.only.is_empty() {
                limits.room.iter().any(|(d, room)| *d == key && *room > 0)
                    || !limits.room.iter().any(|(d, _)| *d == key)
            } else {
                limits.only.contains(&key)
            };
            if read {
                state.more_due = filled.contains(&key);
            } else if limits.only.is_empty() {
                // Passed over with no room: it may have mail due.
                state.more_due = true;
            }
        }
        for key in filled {
            if let Some(destination) = Destination::from_key(key) {
                self.state_of(&destination).more_due = true;
            }
        }
    }

    /// A new destination's window: the local lane takes what its workers
    /// can; remote destinations start small.
    fn window_for(&self, destination: &Destination) -> usize {
        let delivery = &self.context.config.delivery;
        match destination {
            Destination::Local => delivery.local_workers * JOBS_PER_WORKER,
            _ => INITIAL_WINDOW.min(delivery.destination_concurrency),
        }
    }

    /// Forgets idle destinations (their window starts over), but
    /// remembers an unreachable one's window of 1 for a while, and one
    /// with mail still due.
    fn forget_idle(&mut self) {
        let now = Instant::now();
        self.destinations.retain(|_, state| {
            if state.backed_off_until.is_some_and(|until| until <= now) {
                state.backed_off_until = None;
            }
            state.running > 0
                || !state.waiting.is_empty()
                || state.backed_off_until.is_some()
                || state.more_due
                || state.is_slow(now)
        });
    }

    /// Starts waiting jobs of `destination` while its window (and, for a
    /// slow destination, the slow share) allows.
    fn dispatch(&mut self, destination: &Destination) {
        let Some(state) = self.destinations.get_mut(destination) else {
            return;
        };
        let slow = state.is_slow(Instant::now());
        while state.running < state.window {
            if slow && self.slow_running >= self.slow_share {
                break;
            }
            let Some(job) = state.waiting.pop_front() else {
                break;
            };
            let lane = match destination {
                Destination::Local => &self.lanes.local,
                _ => &self.lanes.remote,
            };
            if lane.send(job).is_err() {
                // No workers left (shutting down): the job stays claimed
                // and is recovered at the next start.
                self.outstanding -= 1;
                continue;
            }
            state.running += 1;
            if slow {
                state.running_slow += 1;
                self.slow_running += 1;
            }
        }
    }

    /// A slow job ended: the slow destinations' waiting jobs may use its
    /// place.
    fn dispatch_slow(&mut self) {
        let now = Instant::now();
        let slow: Vec<Destination> = self
            .destinations
            .iter()
            .filter(|(_, state)| state.is_slow(now) && !state.waiting.is_empty())
            .map(|(destination, _)| destination.clone())
            .collect();
        for destination in slow {
            self.dispatch(&destination);
        }
    }

    fn handle(&mut self, event: Event) {
        match event {
            Event::Finished {
                destination,
                reach,
                took,
                recipients,
            } => {
                self.outstanding = self.outstanding.saturating_sub(1);
                let maximum = self.context.config.delivery.destination_concurrency;
                let retry_min = self.context.config.queue.retry_min.get();
                let slow_after = SLOW_ATTEMPT.min(self.context.config.delivery.reply_timeout.get());
                let Some(state) = self.destinations.get_mut(&destination) else {
                    return;
                };
                state.running = state.running.saturating_sub(1);
                if destination == Destination::Local {
                    self.dispatch(&destination);
                    return;
                }
                let freed_slow = state.running_slow > 0;
                if freed_slow {
                    state.running_slow -= 1;
                    self.slow_running = self.slow_running.saturating_sub(1);
                }
                if took >= slow_after {
                    if !state.is_slow(Instant::now()) {
                        log::info!(
                            "delivery: {} is slow (an attempt took {}); its jobs share at most \
                             {} of the remote workers",
                            destination.key(),
                            crate::timefmt::short_duration(took),
                            self.slow_share
                        );
                    }
                    state.slow_until = Some(Instant::now() + SLOW_FOR);
                } else if reach == Reach::Reached {
                    state.slow_until = None;
                }
                if reach == Reach::Reached {
                    state.window = (state.window + 1).min(maximum);
                }
                if backs_off_destination(reach) {
                    state.window = 1;
                    state.more_due = false;
                    state.backed_off_until = Some(Instant::now() + retry_min);
                    let waiting: Vec<Job> = state.waiting.drain(..).collect();
                    let in_flight = state.running;
                    self.back_off(&destination, waiting, recipients, in_flight, retry_min);
                }
                self.dispatch(&destination);
                if freed_slow {
                    self.dispatch_slow();
                }
            }
            Event::Unstarted(job) => {
                self.outstanding = self.outstanding.saturating_sub(1);
                if let Some(state) = self.destinations.get_mut(&job.destination) {
                    state.running = state.running.saturating_sub(1);
                }
                self.requeue_untouched(vec![job]);
            }
        }
    }

    /// The destination could not be reached: its waiting recipients in the
    /// queue, and the jobs claimed for it here, wait `delay` as a whole.
    /// `failed`: the recipients of the job that found it unreachable;
    /// `in_flight`: its jobs still being tried (each is retried on its own
    /// schedule when it ends).
    fn back_off(
        &mut self,
        destination: &Destination,
        claimed: Vec<Job>,
        failed: usize,
        in_flight: usize,
        delay: Duration,
    ) {
        let until = SystemTime::now() + delay;
        self.outstanding = self.outstanding.saturating_sub(claimed.len());
        let ids: Vec<i64> = claimed
            .iter()
            .flat_map(|job| job.recipients.iter().map(|r| r.id))
            .collect();
        let claimed_count = ids.len();
        if !ids.is_empty()
            && let Err(error) = self.context.queue.requeue_at(ids, until)
        {
            log::error!(
                "scheduler: cannot put back jobs for {}: {error}",
                destination.key()
            );
        }
        match self.context.queue.back_off(destination.key(), until) {
            // Every recipient that now waits for it: the failed job's,
            // those claimed here and those in the queue (the log said 0,
            // counting only the last, while 2 waited); and those still
            // being tried.
            Ok(count) => log::info!(
                "delivery: {} unreachable; {} waiting recipients for it retry in {}{}",
                destination.key(),
                failed + count + claimed_count,
                crate::timefmt::short_duration(delay),
                match in_flight {
                    0 => String::new(),
                    1 => "; 1 message is still being tried".to_string(),
                    n => format!("; {n} messages are still being tried"),
                }
            ),
            Err(error) => log::error!("scheduler: cannot back off {}: {error}", destination.key()),
        }
    }

    /// Jobs no worker started go back as they were: attempts and due time
    /// unchanged.
    fn requeue_untouched(&self, jobs: Vec<Job>) {
        let ids: Vec<i64> = jobs
            .iter()
            .flat_map(|job| job.recipients.iter().map(|r| r.id))
            .collect();
        if ids.is_empty() {
            return;
        }
        if let Err(error) = self.context.queue.requeue(ids) {
            log::error!(
                "scheduler: cannot put back unstarted jobs ({error}); recovered at next start"
            );
        }
    }

    /// At the stop: what waits here and in the lanes goes back untouched.
    fn give_back_unstarted(&mut self) {
        let mut unstarted: Vec<Job> = Vec::new();
        for state in self.destinations.values_mut() {
            unstarted.extend(state.waiting.drain(..));
        }
        while let Ok(job) = self.lane_receivers.0.try_recv() {
            unstarted.push(job);
        }
        while let Ok(job) = self.lane_receivers.1.try_recv() {
            unstarted.push(job);
        }
        while let Ok(event) = self.events.try_recv() {
            if let Event::Unstarted(job) = event {
                unstarted.push(job);
            }
        }
        if !unstarted.is_empty() {
            log::info!(
                "delivery: {} jobs not started yet go back to the queue",
                unstarted.len()
            );
            self.requeue_untouched(unstarted);
        }
    }
}

/// One job per message and destination, so recipients at the same domain
/// share one SMTP transaction. Destinations come from the routes stored
/// when the message was accepted.
pub fn group(claimed: Vec<ClaimedRecipient>) -> Vec<Job> {
    let mut jobs: Vec<Job> = Vec::new();
    let mut index: HashMap<(String, Destination), usize> = HashMap::new();
    for recipient in claimed {
        let destination = recipient.route.destination();
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

/// See [`Scheduler::hear`].
fn needs_discovery(news: &News, destinations: &HashMap<Destination, DestinationState>) -> bool {
    let backlogged = |key: &String| {
        Destination::from_key(key)
            .and_then(|destination| destinations.get(&destination))
            .is_some_and(|state| state.more_due)
    };
    news.anything || !news.destinations.iter().all(backlogged)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::Route;

    #[test]
    fn only_new_mail_for_backlogged_destinations_needs_no_discovery() {
        let mut destinations = HashMap::new();
        destinations.insert(
            Destination::SmartHost,
            DestinationState {
                more_due: true,
                ..DestinationState::default()
            },
        );
        destinations.insert(
            Destination::Domain("idle.example".into()),
            DestinationState::default(),
        );
        let news = |anything: bool, keys: &[&str]| News {
            anything,
            destinations: keys.iter().map(|k| k.to_string()).collect(),
        };
        assert!(!needs_discovery(
            &news(false, &["smarthost"]),
            &destinations
        ));
        // New mail elsewhere, or an operator's wake, still walks the queue.
        assert!(needs_discovery(
            &news(false, &["smarthost", "local"]),
            &destinations
        ));
        assert!(needs_discovery(
            &news(false, &["mx:idle.example"]),
            &destinations
        ));
        assert!(needs_discovery(
            &news(false, &["mx:new.example"]),
            &destinations
        ));
        assert!(needs_discovery(&news(true, &[]), &destinations));
        assert!(needs_discovery(&news(true, &["smarthost"]), &destinations));
        // A wake that named nothing (taken by an earlier wake) changes nothing.
        assert!(!needs_discovery(&news(false, &[]), &destinations));
    }

    #[test]
    fn a_waker_that_is_told_too_many_destinations_asks_for_a_look_at_everything() {
        let (signal, woken) = crossbeam_channel::bounded(1);
        let shared = Arc::new(Mutex::new(News::default()));
        let waker = super::super::Waker::for_test(signal, Arc::clone(&shared));
        waker.new_mail_for(["mx:a.example".to_string()]);
        waker.new_mail_for(["mx:a.example".to_string(), "local".to_string()]);
        assert!(woken.try_recv().is_ok());
        let news = News::take(&shared);
        assert!(!news.anything);
        assert_eq!(news.destinations.len(), 2);
        assert!(News::take(&shared).destinations.is_empty());
        waker.new_mail_for((0..2000).map(|n| format!("mx:d{n}.example")));
        let news = News::take(&shared);
        assert!(news.anything);
        assert!(news.destinations.is_empty());
    }

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
