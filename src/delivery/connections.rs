//! The outbound connection cache: after a message is sent, its SMTP
//! connection waits a short while (`delivery.connection_idle`) for the
//! next message to the same destination, as Postfix's connection cache
//! does, saving the TCP and TLS handshakes, the greeting and EHLO (and
//! AUTH with a smart host) for every message after the first.
//!
//! Bounded in every direction: at most `delivery.workers` idle
//! connections, each reused for at most `delivery.connection_reuse_limit`
//! messages and closed after `connection_idle` without one. A reused
//! connection's transaction starts with RSET (in the same write as MAIL
//! FROM where the server pipelines); one the server has closed is
//! dropped and the message goes over a new one.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::client::SmtpClient;
use crate::protocol::client::Extensions;

/// A QUIT to an idle connection waits at most this long for its reply.
const QUIT_WAIT: Duration = Duration::from_millis(500);
/// RSET before reuse: the server should answer at once.
pub const RSET_WAIT: Duration = Duration::from_secs(10);

/// A connection past EHLO (and STARTTLS and AUTH, where they apply),
/// between transactions.
pub struct OpenConnection {
    pub client: SmtpClient,
    pub extensions: Extensions,
    /// host[ip]:port, for the log.
    pub relay: String,
    /// Messages sent over it so far.
    pub uses: usize,
}

struct Idle {
    /// The destination's key ([`super::Destination::key`]).
    destination: String,
    session: OpenConnection,
    since: Instant,
}

struct Shared {
    idle: Mutex<VecDeque<Idle>>,
    /// Wakes the closer: at shutdown, and when a connection comes into an
    /// empty cache.
    changed: Condvar,
    stopped: Mutex<bool>,
}

pub struct ConnectionCache {
    shared: Arc<Shared>,
    capacity: usize,
    reuse_limit: usize,
    idle_time: Duration,
    closer: Mutex<Option<JoinHandle<()>>>,
}

impl ConnectionCache {
    pub fn new(capacity: usize, reuse_limit: usize, idle_time: Duration) -> ConnectionCache {
        let shared = Arc::new(Shared {
            idle: Mutex::new(VecDeque::new()),
            changed: Condvar::new(),
            stopped: Mutex::new(false),
        });
        let closer = if capacity > 0 && reuse_limit > 0 {
            let shared = Arc::clone(&shared);
            std::thread::Builder::new()
                .name("conn-cache".into())
                .spawn(move || close_expired(&shared, idle_time))
                .map_err(|error| {
                    log::warn!("delivery: no connection cache (cannot start its thread: {error})")
                })
                .ok()
        } else {
            None
        };
        let enabled = closer.is_some();
        ConnectionCache {
            shared,
            capacity: if enabled { capacity } else { 0 },
            reuse_limit,
            idle_time,
            closer: Mutex::new(closer),
        }
    }

    /// An idle connection to `destination`. Its transaction must start
    /// with RSET: the server may have closed it meanwhile.
    pub fn take(&self, destination: &str) -> Option<OpenConnection> {
        let mut idle = lock(&self.shared.idle);
        let position = idle
            .iter()
            .position(|i| i.destination == destination && i.since.elapsed() < self.idle_time)?;
        idle.remove(position).map(|idle| idle.session)
    }

    /// Keeps a connection for the next message to `destination`, or
    /// closes it when it has been used enough or the cache is full.
    pub fn put(&self, destination: &str, session: OpenConnection) {
        if session.uses >= self.reuse_limit || self.capacity == 0 {
            session.client.quit_within(QUIT_WAIT);
            return;
        }
        let (was_empty, oldest) = {
            let mut idle = lock(&self.shared.idle);
            let was_empty = idle.is_empty();
            idle.push_back(Idle {
                destination: destination.to_string(),
                session,
                since: Instant::now(),
            });
            let oldest = (idle.len() > self.capacity)
                .then(|| idle.pop_front())
                .flatten();
            (was_empty, oldest)
        };
        // The closer sleeps until the oldest idle connection expires, and
        // this one expires after it; only an empty cache (a closer asleep
        // for a whole idle time) needs waking. Waking it for every message
        // cost a context switch each.
        if was_empty {
            // Under the closer's lock: it is either asleep (and woken) or
            // about to look at the cache (and sees this connection).
            let _closer = lock(&self.shared.stopped);
            self.shared.changed.notify_one();
        }
        if let Some(oldest) = oldest {
            oldest.session.client.quit_within(QUIT_WAIT);
        }
    }

    /// Idle connections right now (tests and logs).
    pub fn idle(&self) -> usize {
        lock(&self.shared.idle).len()
    }

    /// QUITs every idle connection and stops the closer.
    pub fn close_all(&self) {
        *lock(&self.shared.stopped) = true;
        self.shared.changed.notify_all();
        if let Some(closer) = lock(&self.closer).take() {
            let _ = closer.join();
        }
        let idle: Vec<Idle> = lock(&self.shared.idle).drain(..).collect();
        for connection in idle {
            connection.session.client.quit_within(QUIT_WAIT);
        }
    }
}

/// Locks a mutex of the delivery side, whose data is whole after every
/// update: a thread that panicked mid-update leaves it usable.
pub(super) fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Closes connections idle for `idle_time`, until stopped.
fn close_expired(shared: &Shared, idle_time: Duration) {
    loop {
        let expired: Vec<Idle> = {
            let mut idle = lock(&shared.idle);
            let (expired, kept): (Vec<Idle>, Vec<Idle>) =
                idle.drain(..).partition(|i| i.since.elapsed() >= idle_time);
            idle.extend(kept);
            expired
        };
        for connection in expired {
            connection.session.client.quit_within(QUIT_WAIT);
        }
        let stopped = lock(&shared.stopped);
        if *stopped {
            return;
        }
        // The oldest idle connection expires first; nothing idle, sleep
        // until one comes in.
        let next = lock(&shared.idle)
            .front()
            .map(|i| idle_time.saturating_sub(i.since.elapsed()))
            .unwrap_or(idle_time);
        let _ = shared
            .changed
            .wait_timeout(stopped, next.max(Duration::from_millis(10)));
    }
}
