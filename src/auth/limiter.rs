//! Brute-force defence: failed logins are counted per client address
//! (IPv6 per /64, since one host owns a whole /64). After a few failures
//! the replies slow down; after more, the address is refused for a while.
//! Only the guessing address is affected, never other clients.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::config::AuthConfig;

/// The slowdown never exceeds this: past it, lockout does the work.
const MAX_DELAY: Duration = Duration::from_secs(5);
/// Beyond this many tracked addresses, stale entries are dropped.
const PRUNE_ABOVE: usize = 10_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureOutcome {
    /// Answer after this long (zero: at once).
    Delay(Duration),
    LockedOut,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    failures: u32,
    last_failure: Instant,
    locked_until: Option<Instant>,
}

#[derive(Debug)]
pub struct AuthLimiter {
    slowdown_after: u32,
    slowdown_step: Duration,
    lockout_after: u32,
    lockout_duration: Duration,
    entries: Mutex<HashMap<IpAddr, Entry>>,
}

fn key(ip: IpAddr) -> IpAddr {
    match crate::config::canonical_ip(ip) {
        IpAddr::V6(v6) => {
            let segments = v6.segments();
            IpAddr::V6(std::net::Ipv6Addr::new(
                segments[0],
                segments[1],
                segments[2],
                segments[3],
                0,
                0,
                0,
                0,
            ))
        }
        v4 => v4,
    }
}

impl AuthLimiter {
    pub fn new(config: &AuthConfig) -> AuthLimiter {
        AuthLimiter {
            slowdown_after: config.slowdown_after,
            slowdown_step: config.slowdown_step.get(),
            lockout_after: config.lockout_after,
            lockout_duration: config.lockout_duration.get(),
            entries: Mutex::new(HashMap::new()),
        }
    }

    pub fn is_locked_out(&self, ip: IpAddr) -> bool {
        self.is_locked_out_at(ip, Instant::now())
    }

    fn is_locked_out_at(&self, ip: IpAddr, now: Instant) -> bool {
        let entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        entries
            .get(&key(ip))
            .and_then(|entry| entry.locked_until)
            .is_some_and(|until| now < until)
    }

    pub fn record_failure(&self, ip: IpAddr) -> FailureOutcome {
        self.record_failure_at(ip, Instant::now())
    }

    fn record_failure_at(&self, ip: IpAddr, now: Instant) -> FailureOutcome {
        let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        if entries.len() > PRUNE_ABOVE {
            let horizon = self.lockout_duration;
            entries.retain(|_, entry| now.duration_since(entry.last_failure) < horizon);
        }
        let entry = entries.entry(key(ip)).or_insert(Entry {
            failures: 0,
            last_failure: now,
            locked_until: None,
        });
        // A quiet period as long as a lockout forgives old failures.
        if now.duration_since(entry.last_failure) >= self.lockout_duration {
            entry.failures = 0;
            entry.locked_until = None;
        }
        entry.failures += 1;
        entry.last_failure = now;
        if entry.failures >= self.lockout_after {
            entry.locked_until = Some(now + self.lockout_duration);
            return FailureOutcome::LockedOut;
        }
        let over = entry.failures.saturating_sub(self.slowdown_after);
        FailureOutcome::Delay((self.slowdown_step * over).min(MAX_DELAY))
    }

    pub fn record_success(&self, ip: IpAddr) {
        self.entries
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&key(ip));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::HumanDuration;

    fn limiter() -> AuthLimiter {
        AuthLimiter::new(&AuthConfig {
            slowdown_after: 2,
            slowdown_step: HumanDuration::secs(1),
            lockout_after: 5,
            lockout_duration: HumanDuration::secs(600),
            ..AuthConfig::default()
        })
    }

    #[test]
    fn slows_down_then_locks_out_one_address_only() {
        let limiter = limiter();
        let attacker: IpAddr = "192.0.2.9".parse().unwrap();
        let bystander: IpAddr = "192.0.2.10".parse().unwrap();
        let now = Instant::now();
        let outcomes: Vec<FailureOutcome> = (0..5)
            .map(|_| limiter.record_failure_at(attacker, now))
            .collect();
        assert_eq!(
            outcomes,
            vec![
                FailureOutcome::Delay(Duration::ZERO),
                FailureOutcome::Delay(Duration::ZERO),
                FailureOutcome::Delay(Duration::from_secs(1)),
                FailureOutcome::Delay(Duration::from_secs(2)),
                FailureOutcome::LockedOut,
            ]
        );
        assert!(limiter.is_locked_out_at(attacker, now));
        assert!(!limiter.is_locked_out_at(bystander, now));
        assert!(!limiter.is_locked_out_at(attacker, now + Duration::from_secs(601)));
    }

    #[test]
    fn old_failures_are_forgiven_and_success_resets() {
        let limiter = limiter();
        let ip: IpAddr = "192.0.2.9".parse().unwrap();
        let now = Instant::now();
        for _ in 0..4 {
            limiter.record_failure_at(ip, now);
        }
        let later = now + Duration::from_secs(700);
        assert_eq!(
            limiter.record_failure_at(ip, later),
            FailureOutcome::Delay(Duration::ZERO)
        );
        limiter.record_success(ip);
        assert_eq!(
            limiter.record_failure_at(ip, later),
            FailureOutcome::Delay(Duration::ZERO)
        );
    }

    #[test]
    fn ipv6_is_counted_per_64() {
        let limiter = limiter();
        let now = Instant::now();
        for n in 0..5 {
            let ip: IpAddr = format!("2001:db8:1:2::{n}").parse().unwrap();
            limiter.record_failure_at(ip, now);
        }
        assert!(limiter.is_locked_out_at("2001:db8:1:2::ffff".parse().unwrap(), now));
        assert!(!limiter.is_locked_out_at("2001:db8:1:3::1".parse().unwrap(), now));
    }
}
