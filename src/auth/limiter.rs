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

#[derive(Debug, Clone)]
struct Entry {
    failures: u32,
    last_failure: Instant,
    locked_until: Option<Instant>,
    /// The account the attempt that locked this address aimed at: what
    /// `petrel user unlock` of that account lifts.
    locked_for: Option<String>,
}

impl Entry {
    fn new(now: Instant) -> Entry {
        Entry {
            failures: 0,
            last_failure: now,
            locked_until: None,
            locked_for: None,
        }
    }

    fn lock(&mut self, until: Instant, account: Option<&str>) {
        self.locked_until = Some(until);
        self.locked_for = account.map(str::to_string);
    }
}

#[derive(Debug, Default)]
struct Counts {
    addresses: HashMap<IpAddr, Entry>,
    accounts: HashMap<String, Entry>,
    /// Lockouts begun since the last [`AuthLimiter::take_new_lockouts`].
    new_lockouts: Vec<NewLockout>,
}

/// A client address just locked out, for the record `petrel user list`
/// reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewLockout {
    /// The address, or the IPv6 /64, as counted.
    pub client: IpAddr,
    pub account: Option<String>,
    pub duration: Duration,
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
            entry.lock(now + self.lockout_duration, account);
            counts.new_lockouts.push(NewLockout {
                client: address,
                account: account.map(str::to_string),
                duration: self.lockout_duration,
            });
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
            entry.lock(now + self.lockout_duration, attempt.account.as_deref());
            counts.new_lockouts.push(NewLockout {
                client: attempt.address,
                account: attempt.account.clone(),
                duration: self.lockout_duration,
            });
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

    /// Lockouts begun since the last call (to be recorded).
    pub fn take_new_lockouts(&self) -> Vec<NewLockout> {
        std::mem::take(&mut self.lock().new_lockouts)
    }

    /// A lockout recorded before a restart, still running.
    pub fn restore_lockout(&self, client: IpAddr, account: Option<&str>, remaining: Duration) {
        let now = Instant::now();
        let mut counts = self.lock();
        let entry = counts
            .addresses
            .entry(client_key(client))
            .or_insert(Entry::new(now));
        entry.failures = self.lockout_after;
        entry.last_failure = now;
        entry.lock(now + remaining, account);
    }

    /// `petrel user unlock`: forgets the failures at `account` and lifts
    /// the lockouts of the addresses that failed at it. Returns those.
    pub fn unlock_account(&self, account: &str) -> Vec<IpAddr> {
        let mut counts = self.lock();
        counts.accounts.remove(account);
        let lifted: Vec<IpAddr> = counts
            .addresses
            .iter()
            .filter(|(_, entry)| entry.locked_for.as_deref() == Some(account))
            .map(|(address, _)| *address)
            .collect();
        for address in &lifted {
            counts.addresses.remove(address);
        }
        lifted
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
    fn unlocking_an_account_lifts_the_lockouts_its_failures_caused() {
        let limiter = limiter();
        let now = Instant::now();
        let phone: IpAddr = "198.51.100.7".parse().unwrap();
        let attacker: IpAddr = "192.0.2.9".parse().unwrap();
        for _ in 0..5 {
            fail(&limiter, phone, Some("alice@example.com"), now);
            fail(&limiter, attacker, Some("bob@example.com"), now);
        }
        assert!(limiter.is_locked_out_at(phone, now));
        let recorded = limiter.take_new_lockouts();
        assert_eq!(recorded.len(), 2, "{recorded:?}");
        assert!(recorded.iter().any(|l| l.client == phone
            && l.account.as_deref() == Some("alice@example.com")
            && l.duration == Duration::from_secs(600)));
        assert!(limiter.take_new_lockouts().is_empty(), "taken once");
        assert_eq!(limiter.unlock_account("alice@example.com"), vec![phone]);
        assert!(!limiter.is_locked_out_at(phone, now));
        assert!(
            limiter.is_locked_out_at(attacker, now),
            "bob's attacker stays out"
        );
        // Refused attempts of a locked address are not new lockouts.
        fail(&limiter, attacker, Some("bob@example.com"), now);
        assert!(limiter.take_new_lockouts().is_empty());

        // A restart keeps what was recorded.
        let restarted = super::AuthLimiter::new(&AuthConfig {
            lockout_after: 5,
            ..AuthConfig::default()
        });
        restarted.restore_lockout(attacker, Some("bob@example.com"), Duration::from_secs(60));
        assert!(restarted.is_locked_out(attacker));
        assert_eq!(restarted.unlock_account("bob@example.com"), vec![attacker]);
        assert!(!restarted.is_locked_out(attacker));
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
