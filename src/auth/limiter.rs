//! Brute-force defence. Every login attempt is counted as a failure the
//! moment it starts, before any password is checked, so parallel guesses
//! are counted exactly and a locked-out address never costs a hash. Counts
//! are kept per client address (IPv6 per /64, since one host owns a whole
//! /64) and per account:
//! - an address is slowed down after a few failures, then refused for a
//!   while; a successful login takes back only its own attempt, so logging
//!   in to one's own account never clears the guesses made at others;
//! - an account's failures slow down every attempt at it, from anywhere
//!   (distributed guessing), and are cleared by its own successful login.
//!   An account is never locked: that would let anyone lock out its owner.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::config::AuthConfig;

/// The slowdown never exceeds this: past it, lockout does the work.
const MAX_DELAY: Duration = Duration::from_secs(5);
/// Beyond this many tracked addresses or accounts, stale entries are dropped.
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

impl Entry {
    fn new(now: Instant) -> Entry {
        Entry {
            failures: 0,
            last_failure: now,
            locked_until: None,
        }
    }
}

#[derive(Debug, Default)]
struct Counts {
    addresses: HashMap<IpAddr, Entry>,
    accounts: HashMap<String, Entry>,
}

#[derive(Debug)]
pub struct AuthLimiter {
    slowdown_after: u32,
    slowdown_step: Duration,
    lockout_after: u32,
    lockout_duration: Duration,
    counts: Mutex<Counts>,
}

/// An attempt in progress, already counted; settle it with
/// [`AuthLimiter::succeeded`], [`AuthLimiter::failed`] or
/// [`AuthLimiter::abandoned`].
#[derive(Debug)]
#[must_use]
pub struct Attempt {
    address: IpAddr,
    account: Option<String>,
}

/// The address or /64 failures are counted under.
pub fn client_key(ip: IpAddr) -> IpAddr {
    match crate::config::canonical_ip(ip) {
        IpAddr::V6(v6) => {
            let bits = u128::from(v6) & (u128::MAX << 64);
            IpAddr::V6(std::net::Ipv6Addr::from(bits))
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
            counts: Mutex::new(Counts::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Counts> {
        self.counts.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn is_locked_out(&self, ip: IpAddr) -> bool {
        self.is_locked_out_at(ip, Instant::now())
    }

    fn is_locked_out_at(&self, ip: IpAddr, now: Instant) -> bool {
        self.lock()
            .addresses
            .get(&client_key(ip))
            .and_then(|entry| entry.locked_until)
            .is_some_and(|until| now < until)
    }

    /// Starts an attempt from `ip` at `account` (an existing account's
    /// key; `None` for names that are not accounts, which are not tracked
    /// so strangers cannot grow the table). Counted as a failure now.
    pub fn begin(&self, ip: IpAddr, account: Option<&str>) -> Result<Attempt, FailureOutcome> {
        self.begin_at(ip, account, Instant::now())
    }

    fn begin_at(
        &self,
        ip: IpAddr,
        account: Option<&str>,
        now: Instant,
    ) -> Result<Attempt, FailureOutcome> {
        let address = client_key(ip);
        let horizon = self.lockout_duration;
        let mut counts = self.lock();
        if counts.addresses.len() > PRUNE_ABOVE {
            counts
                .addresses
                .retain(|_, entry| now.duration_since(entry.last_failure) < horizon);
        }
        if counts.accounts.len() > PRUNE_ABOVE {
            counts
                .accounts
                .retain(|_, entry| now.duration_since(entry.last_failure) < horizon);
        }
        let entry = counts.addresses.entry(address).or_insert(Entry::new(now));
        if entry.locked_until.is_some_and(|until| now < until) {
            return Err(FailureOutcome::LockedOut);
        }
        self.count(entry, now);
        // Attempts still being checked count too: guesses sent in parallel
        // cannot slip past the limit.
        if entry.failures > self.lockout_after {
            entry.failures = self.lockout_after;
            entry.locked_until = Some(now + self.lockout_duration);
            return Err(FailureOutcome::LockedOut);
        }
        if let Some(account) = account {
            let entry = counts
                .accounts
                .entry(account.to_string())
                .or_insert(Entry::new(now));
            self.count(entry, now);
        }
        Ok(Attempt {
            address,
            account: account.map(str::to_string),
        })
    }

    /// One more failure on an entry; a quiet period as long as a lockout
    /// forgives the older ones.
    fn count(&self, entry: &mut Entry, now: Instant) {
        if now.duration_since(entry.last_failure) >= self.lockout_duration {
            entry.failures = 0;
            entry.locked_until = None;
        }
        entry.failures += 1;
        entry.last_failure = now;
    }

    /// The password was wrong: the attempt stays counted. Returns how long
    /// to wait before answering, or that the address is now locked out.
    pub fn failed(&self, attempt: Attempt) -> FailureOutcome {
        self.failed_at(attempt, Instant::now())
    }

    fn failed_at(&self, attempt: Attempt, now: Instant) -> FailureOutcome {
        let mut counts = self.lock();
        let account_failures = attempt
            .account
            .as_ref()
            .and_then(|account| counts.accounts.get(account))
            .map_or(0, |entry| entry.failures);
        let Some(entry) = counts.addresses.get_mut(&attempt.address) else {
            return FailureOutcome::Delay(Duration::ZERO);
        };
        if entry.failures >= self.lockout_after {
            entry.locked_until = Some(now + self.lockout_duration);
            return FailureOutcome::LockedOut;
        }
        let over = entry
            .failures
            .max(account_failures)
            .saturating_sub(self.slowdown_after);
        FailureOutcome::Delay((self.slowdown_step * over).min(MAX_DELAY))
    }

    /// The password was right: this attempt is taken back from the
    /// address's count (the others stay) and the account's failures are
    /// cleared.
    pub fn succeeded(&self, attempt: Attempt) {
        let mut counts = self.lock();
        if let Some(entry) = counts.addresses.get_mut(&attempt.address) {
            entry.failures = entry.failures.saturating_sub(1);
        }
        if let Some(account) = &attempt.account {
            counts.accounts.remove(account);
        }
    }

    /// The password was not checked (the server was too busy): the attempt
    /// is taken back entirely.
    pub fn abandoned(&self, attempt: Attempt) {
        let mut counts = self.lock();
        if let Some(entry) = counts.addresses.get_mut(&attempt.address) {
            entry.failures = entry.failures.saturating_sub(1);
        }
        if let Some(entry) = attempt
            .account
            .as_ref()
            .and_then(|account| counts.accounts.get_mut(account))
        {
            entry.failures = entry.failures.saturating_sub(1);
        }
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

    fn fail(
        limiter: &AuthLimiter,
        ip: IpAddr,
        account: Option<&str>,
        now: Instant,
    ) -> FailureOutcome {
        match limiter.begin_at(ip, account, now) {
            Ok(attempt) => limiter.failed_at(attempt, now),
            Err(outcome) => outcome,
        }
    }

    #[test]
    fn slows_down_then_locks_out_one_address_only() {
        let limiter = limiter();
        let attacker: IpAddr = "192.0.2.9".parse().unwrap();
        let bystander: IpAddr = "192.0.2.10".parse().unwrap();
        let now = Instant::now();
        let outcomes: Vec<FailureOutcome> = (0..6)
            .map(|_| fail(&limiter, attacker, None, now))
            .collect();
        assert_eq!(
            outcomes,
            vec![
                FailureOutcome::Delay(Duration::ZERO),
                FailureOutcome::Delay(Duration::ZERO),
                FailureOutcome::Delay(Duration::from_secs(1)),
                FailureOutcome::Delay(Duration::from_secs(2)),
                FailureOutcome::LockedOut,
                FailureOutcome::LockedOut,
            ]
        );
        assert!(limiter.is_locked_out_at(attacker, now));
        assert!(!limiter.is_locked_out_at(bystander, now));
        assert!(!limiter.is_locked_out_at(attacker, now + Duration::from_secs(601)));
    }

    #[test]
    fn attempts_are_counted_before_the_check() {
        // Twenty guesses in flight at once: only lockout_after get to a
        // password check, whatever order they finish in.
        let limiter = limiter();
        let ip: IpAddr = "192.0.2.9".parse().unwrap();
        let now = Instant::now();
        let started: Vec<Result<Attempt, FailureOutcome>> =
            (0..20).map(|_| limiter.begin_at(ip, None, now)).collect();
        let admitted = started.iter().filter(|a| a.is_ok()).count();
        assert_eq!(admitted, 5);
        for attempt in started.into_iter().flatten() {
            limiter.failed_at(attempt, now);
        }
        assert!(limiter.is_locked_out_at(ip, now));
    }

    #[test]
    fn a_success_clears_only_its_own_attempt() {
        let limiter = limiter();
        let ip: IpAddr = "192.0.2.9".parse().unwrap();
        let now = Instant::now();
        for _ in 0..4 {
            fail(&limiter, ip, Some("alice@example.com"), now);
        }
        // The attacker logs in to their own account in between ...
        let own = limiter
            .begin_at(ip, Some("mallory@example.com"), now)
            .unwrap();
        limiter.succeeded(own);
        // ... and the next guess at alice still locks the address out.
        assert_eq!(
            fail(&limiter, ip, Some("alice@example.com"), now),
            FailureOutcome::LockedOut
        );
    }

    #[test]
    fn guesses_at_one_account_from_many_addresses_slow_it_down() {
        let limiter = limiter();
        let now = Instant::now();
        let mut last = FailureOutcome::Delay(Duration::ZERO);
        for n in 0..6 {
            let ip: IpAddr = format!("198.51.100.{n}").parse().unwrap();
            last = fail(&limiter, ip, Some("alice@example.com"), now);
        }
        assert_eq!(last, FailureOutcome::Delay(Duration::from_secs(4)));
        // alice's own login clears it.
        let ok = limiter
            .begin_at(
                "203.0.113.1".parse().unwrap(),
                Some("alice@example.com"),
                now,
            )
            .unwrap();
        limiter.succeeded(ok);
        assert_eq!(
            fail(
                &limiter,
                "203.0.113.2".parse().unwrap(),
                Some("alice@example.com"),
                now
            ),
            FailureOutcome::Delay(Duration::ZERO)
        );
    }

    #[test]
    fn old_failures_are_forgiven_and_abandoned_attempts_do_not_count() {
        let limiter = limiter();
        let ip: IpAddr = "192.0.2.9".parse().unwrap();
        let now = Instant::now();
        for _ in 0..4 {
            fail(&limiter, ip, None, now);
        }
        let later = now + Duration::from_secs(700);
        assert_eq!(
            fail(&limiter, ip, None, later),
            FailureOutcome::Delay(Duration::ZERO)
        );
        for _ in 0..10 {
            let attempt = limiter.begin_at(ip, None, later).unwrap();
            limiter.abandoned(attempt);
        }
        assert_eq!(
            fail(&limiter, ip, None, later),
            FailureOutcome::Delay(Duration::ZERO)
        );
    }

    #[test]
    fn ipv6_is_counted_per_64() {
        let limiter = limiter();
        let now = Instant::now();
        for n in 0..5 {
            let ip: IpAddr = format!("2001:db8:1:2::{n}").parse().unwrap();
            fail(&limiter, ip, None, now);
        }
        assert!(limiter.is_locked_out_at("2001:db8:1:2::ffff".parse().unwrap(), now));
        assert!(!limiter.is_locked_out_at("2001:db8:1:3::1".parse().unwrap(), now));
    }
}
