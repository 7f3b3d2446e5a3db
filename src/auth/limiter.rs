//! Brute-force defence. Counts are kept per client address (IPv6 per
//! /64, since one host owns a whole /64) and per login name:
//! - an address is slowed down after a few failed checks, then refused for
//!   a while. Only a password check that *failed* counts; a correct login
//!   never counts, and never clears the guesses made at other accounts;
//! - a login name's failures slow down every attempt at it, from anywhere
//!   (distributed guessing), and are cleared by its own successful login.
//!   Names that are not accounts are counted the same way, so the delays
//!   never tell which names exist. A name is never locked: that would let
//!   anyone lock out its owner.
//!
//! Parallel guesses cannot slip past the limit: from one address, the
//! checks in progress plus the failures already counted never exceed
//! `lockout_after`. An attempt beyond that waits for one in progress to
//! end (a web application's pool of fifty correct logins waits a moment,
//! is not locked out), and gives up with a temporary error, uncounted,
//! when its wait runs out.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::config::AuthConfig;

/// The slowdown never exceeds this: past it, lockout does the work.
const MAX_DELAY: Duration = Duration::from_secs(5);
/// Beyond this many tracked addresses or names, stale entries are
/// dropped, and then the longest quiet ones: strangers cannot grow the
/// tables without bound.
const MAX_TRACKED: usize = 10_000;
/// A login name is counted by at most this much of it.
const MAX_NAME: usize = 320;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureOutcome {
    /// Answer after this long (zero: at once).
    Delay(Duration),
    LockedOut,
}

/// Why an attempt may not go ahead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The address is locked out.
    LockedOut,
    /// Too many checks from this address are still running: try again in
    /// a moment (not counted as a failure).
    Busy,
}

#[derive(Debug, Clone)]
struct Entry {
    failures: u32,
    /// Checks begun and not yet settled (addresses only).
    in_flight: u32,
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
            in_flight: 0,
            last_failure: now,
            locked_until: None,
            locked_for: None,
        }
    }

    fn lock(&mut self, until: Instant, account: Option<&str>) {
        self.locked_until = Some(until);
        self.locked_for = account.map(str::to_string);
    }

    fn is_locked(&self, now: Instant) -> bool {
        self.locked_until.is_some_and(|until| now < until)
    }

    /// A quiet period as long as a lockout forgives older failures.
    fn forgive(&mut self, now: Instant, horizon: Duration) {
        if now.duration_since(self.last_failure) >= horizon {
            self.failures = 0;
            self.locked_until = None;
        }
    }
}

#[derive(Debug, Default)]
struct Counts {
    addresses: HashMap<IpAddr, Entry>,
    names: HashMap<String, Entry>,
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
    /// Signalled when a check ends, for attempts waiting their turn.
    settled: Condvar,
}

/// An attempt in progress; settle it with [`AuthLimiter::succeeded`],
/// [`AuthLimiter::failed`] or [`AuthLimiter::abandoned`].
#[derive(Debug)]
#[must_use]
pub struct LoginAttempt {
    address: IpAddr,
    /// The login name as counted (every name, account or not).
    name: String,
    /// The existing account it names, for lockout records.
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

/// Keeps a table within [`MAX_TRACKED`]: entries quiet for a whole
/// lockout go first, then the quietest.
fn prune<K: Clone + Eq + std::hash::Hash>(
    table: &mut HashMap<K, Entry>,
    now: Instant,
    horizon: Duration,
) {
    if table.len() < MAX_TRACKED {
        return;
    }
    table.retain(|_, entry| {
        entry.in_flight > 0
            || entry.is_locked(now)
            || now.duration_since(entry.last_failure) < horizon
    });
    while table.len() >= MAX_TRACKED {
        let quietest = table
            .iter()
            .filter(|(_, entry)| entry.in_flight == 0 && !entry.is_locked(now))
            .min_by_key(|(_, entry)| entry.last_failure)
            .map(|(key, _)| key.clone());
        match quietest {
            Some(key) => {
                table.remove(&key);
            }
            None => break,
        }
    }
}

impl AuthLimiter {
    pub fn new(config: &AuthConfig) -> AuthLimiter {
        AuthLimiter {
            slowdown_after: config.slowdown_after,
            slowdown_step: config.slowdown_step.get(),
            lockout_after: config.lockout_after.max(1),
            lockout_duration: config.lockout_duration.get(),
            counts: Mutex::new(Counts::default()),
            settled: Condvar::new(),
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
            .is_some_and(|entry| entry.is_locked(now))
    }

    /// Starts an attempt from `ip` with the login name `name` (`account`:
    /// the existing account it names, if any), waiting until `deadline`
    /// for a turn when this address already has as many checks running
    /// as it has failures left.
    pub fn begin(
        &self,
        ip: IpAddr,
        name: &str,
        account: Option<&str>,
        deadline: Instant,
    ) -> Result<LoginAttempt, Refused> {
        self.begin_with(ip, name, account, deadline, Instant::now)
    }

    /// [`AuthLimiter::begin`] with the time from `clock` (tests).
    fn begin_with(
        &self,
        ip: IpAddr,
        name: &str,
        account: Option<&str>,
        deadline: Instant,
        clock: impl Fn() -> Instant,
    ) -> Result<LoginAttempt, Refused> {
        let address = client_key(ip);
        let horizon = self.lockout_duration;
        let mut counts = self.lock();
        loop {
            let now = clock();
            prune(&mut counts.addresses, now, horizon);
            let entry = counts.addresses.entry(address).or_insert(Entry::new(now));
            entry.forgive(now, horizon);
            if entry.is_locked(now) {
                return Err(Refused::LockedOut);
            }
            if entry.failures + entry.in_flight < self.lockout_after {
                entry.in_flight += 1;
                break;
            }
            let Some(left) = deadline
                .checked_duration_since(now)
                .filter(|d| !d.is_zero())
            else {
                return Err(Refused::Busy);
            };
            counts = self
                .settled
                .wait_timeout(counts, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        Ok(LoginAttempt {
            address,
            name: counted_name(name),
            account: account.map(str::to_string),
        })
    }

    /// Ends the attempt's check, with `failed` and `succeeded` in the
    /// counts; wakes an attempt waiting its turn.
    fn settle<T>(
        &self,
        attempt: &LoginAttempt,
        now: Instant,
        change: impl FnOnce(&mut Counts, Instant) -> T,
    ) -> T {
        let mut counts = self.lock();
        if let Some(entry) = counts.addresses.get_mut(&attempt.address) {
            entry.in_flight = entry.in_flight.saturating_sub(1);
        }
        let result = change(&mut counts, now);
        drop(counts);
        self.settled.notify_all();
        result
    }

    /// The password was wrong: one more failure for the address and the
    /// name. Returns how long to wait before answering, or that the
    /// address is now locked out.
    pub fn failed(&self, attempt: LoginAttempt) -> FailureOutcome {
        self.failed_at(attempt, Instant::now())
    }

    fn failed_at(&self, attempt: LoginAttempt, now: Instant) -> FailureOutcome {
        self.settle(&attempt, now, |counts, now| {
            let horizon = self.lockout_duration;
            prune(&mut counts.names, now, horizon);
            let name = counts
                .names
                .entry(attempt.name.clone())
                .or_insert(Entry::new(now));
            name.forgive(now, horizon);
            name.failures += 1;
            name.last_failure = now;
            let name_failures = name.failures;
            let entry = counts
                .addresses
                .entry(attempt.address)
                .or_insert(Entry::new(now));
            entry.forgive(now, horizon);
            entry.failures += 1;
            entry.last_failure = now;
            if entry.failures >= self.lockout_after {
                if !entry.is_locked(now) {
                    entry.lock(now + horizon, attempt.account.as_deref());
                    counts.new_lockouts.push(NewLockout {
                        client: attempt.address,
                        account: attempt.account.clone(),
                        duration: horizon,
                    });
                }
                return FailureOutcome::LockedOut;
            }
            let over = entry
                .failures
                .max(name_failures)
                .saturating_sub(self.slowdown_after);
            FailureOutcome::Delay((self.slowdown_step * over).min(MAX_DELAY))
        })
    }

    /// The password was right: the name's failures are cleared; the
    /// address's stay (they may be guesses at other accounts).
    pub fn succeeded(&self, attempt: LoginAttempt) {
        self.settle(&attempt, Instant::now(), |counts, _| {
            counts.names.remove(&attempt.name);
        });
    }

    /// The password was not checked (the server was too busy): nothing
    /// is counted.
    pub fn abandoned(&self, attempt: LoginAttempt) {
        self.settle(&attempt, Instant::now(), |_, _| {});
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
        counts.names.remove(&counted_name(account));
        let lifted: Vec<IpAddr> = counts
            .addresses
            .iter()
            .filter(|(_, entry)| entry.locked_for.as_deref() == Some(account))
            .map(|(address, _)| *address)
            .collect();
        for address in &lifted {
            if let Some(entry) = counts.addresses.get_mut(address) {
                entry.failures = 0;
                entry.locked_until = None;
                entry.locked_for = None;
            }
        }
        drop(counts);
        self.settled.notify_all();
        lifted
    }
}

/// The form a login name is counted under: lower case, bounded.
fn counted_name(name: &str) -> String {
    let mut end = name.len().min(MAX_NAME);
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    name[..end].to_lowercase()
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

    fn begin(
        limiter: &AuthLimiter,
        ip: IpAddr,
        name: &str,
        account: Option<&str>,
        now: Instant,
    ) -> Result<LoginAttempt, Refused> {
        limiter.begin_with(ip, name, account, now, || now)
    }

    /// A wrong password for `name` (an account when `account`).
    fn fail(
        limiter: &AuthLimiter,
        ip: IpAddr,
        name: &str,
        account: bool,
        now: Instant,
    ) -> FailureOutcome {
        match begin(limiter, ip, name, account.then_some(name), now) {
            Ok(attempt) => limiter.failed_at(attempt, now),
            Err(Refused::LockedOut) => FailureOutcome::LockedOut,
            Err(Refused::Busy) => panic!("busy"),
        }
    }

    #[test]
    fn slows_down_then_locks_out_one_address_only() {
        let limiter = limiter();
        let attacker: IpAddr = "192.0.2.9".parse().unwrap();
        let bystander: IpAddr = "192.0.2.10".parse().unwrap();
        let now = Instant::now();
        let outcomes: Vec<FailureOutcome> = (0..6)
            .map(|n| fail(&limiter, attacker, &format!("guess{n}"), false, now))
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
    fn checks_in_flight_never_outnumber_the_failures_left() {
        // Twenty guesses at once: only lockout_after get to a password
        // check; the others are told to come back, and are not counted.
        let limiter = limiter();
        let ip: IpAddr = "192.0.2.9".parse().unwrap();
        let now = Instant::now();
        let started: Vec<Result<LoginAttempt, Refused>> = (0..20)
            .map(|_| begin(&limiter, ip, "alice@example.com", None, now))
            .collect();
        let admitted = started.iter().filter(|a| a.is_ok()).count();
        assert_eq!(admitted, 5);
        assert!(
            started
                .iter()
                .filter_map(|a| a.as_ref().err())
                .all(|refused| *refused == Refused::Busy)
        );
        assert!(!limiter.is_locked_out_at(ip, now), "waiting is not failing");
        for attempt in started.into_iter().flatten() {
            limiter.failed_at(attempt, now);
        }
        assert!(limiter.is_locked_out_at(ip, now));
    }

    #[test]
    fn fifty_correct_logins_at_once_from_one_address_all_get_through() {
        let limiter = std::sync::Arc::new(limiter());
        let ip: IpAddr = "198.51.100.7".parse().unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        let threads: Vec<_> = (0..50)
            .map(|_| {
                let limiter = std::sync::Arc::clone(&limiter);
                std::thread::spawn(move || {
                    let attempt = limiter
                        .begin(ip, "app@example.com", Some("app@example.com"), deadline)
                        .expect("a turn within the wait");
                    std::thread::sleep(Duration::from_millis(5));
                    limiter.succeeded(attempt);
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
        assert!(!limiter.is_locked_out(ip));
        assert!(limiter.take_new_lockouts().is_empty());
        assert_eq!(limiter.lock().addresses[&ip].in_flight, 0);
    }

    #[test]
    fn a_success_clears_only_its_own_name() {
        let limiter = limiter();
        let ip: IpAddr = "192.0.2.9".parse().unwrap();
        let now = Instant::now();
        for _ in 0..4 {
            fail(&limiter, ip, "alice@example.com", true, now);
        }
        // The attacker logs in to their own account in between ...
        let own = begin(
            &limiter,
            ip,
            "mallory@example.com",
            Some("mallory@example.com"),
            now,
        )
        .unwrap();
        limiter.succeeded(own);
        // ... and the next guess at alice still locks the address out.
        assert_eq!(
            fail(&limiter, ip, "alice@example.com", true, now),
            FailureOutcome::LockedOut
        );
    }

    #[test]
    fn guesses_at_one_name_from_many_addresses_slow_it_down() {
        let limiter = limiter();
        let now = Instant::now();
        let mut last = FailureOutcome::Delay(Duration::ZERO);
        for n in 0..6 {
            let ip: IpAddr = format!("198.51.100.{n}").parse().unwrap();
            last = fail(&limiter, ip, "alice@example.com", true, now);
        }
        assert_eq!(last, FailureOutcome::Delay(Duration::from_secs(4)));
        // alice's own login clears it.
        let ok = begin(
            &limiter,
            "203.0.113.1".parse().unwrap(),
            "alice@example.com",
            Some("alice@example.com"),
            now,
        )
        .unwrap();
        limiter.succeeded(ok);
        assert_eq!(
            fail(
                &limiter,
                "203.0.113.2".parse().unwrap(),
                "alice@example.com",
                true,
                now
            ),
            FailureOutcome::Delay(Duration::ZERO)
        );
    }

    #[test]
    fn names_that_are_not_accounts_are_slowed_down_alike() {
        // The enumeration attack: four wrong tries at a name, then a fifth
        // from a new address. Its delay must not tell whether the name is
        // an account.
        let limiter = limiter();
        let now = Instant::now();
        let fifth = |name: &str, account: bool, net: u8| {
            for n in 0..4 {
                let ip: IpAddr = format!("198.51.{net}.{n}").parse().unwrap();
                fail(&limiter, ip, name, account, now);
            }
            let fresh: IpAddr = format!("198.51.{net}.99").parse().unwrap();
            fail(&limiter, fresh, name, account, now)
        };
        let existing = fifth("alice@example.com", true, 100);
        let unknown = fifth("nobody@example.com", false, 101);
        assert_eq!(existing, FailureOutcome::Delay(Duration::from_secs(3)));
        assert_eq!(unknown, existing);
        // Names differing in case are one name.
        assert_eq!(
            fail(
                &limiter,
                "192.0.2.50".parse().unwrap(),
                "NOBODY@example.com",
                false,
                now
            ),
            FailureOutcome::Delay(Duration::from_secs(4))
        );
    }

    #[test]
    fn strangers_cannot_grow_the_tables_without_bound() {
        let limiter = limiter();
        let now = Instant::now();
        for n in 0..(MAX_TRACKED as u32 + 500) {
            let ip = IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + n));
            fail(&limiter, ip, &format!("name{n}@example.com"), false, now);
        }
        let counts = limiter.lock();
        assert!(counts.names.len() <= MAX_TRACKED, "{}", counts.names.len());
        assert!(
            counts.addresses.len() <= MAX_TRACKED,
            "{}",
            counts.addresses.len()
        );
    }

    #[test]
    fn old_failures_are_forgiven_and_abandoned_attempts_do_not_count() {
        let limiter = limiter();
        let ip: IpAddr = "192.0.2.9".parse().unwrap();
        let now = Instant::now();
        for _ in 0..4 {
            fail(&limiter, ip, "x", false, now);
        }
        let later = now + Duration::from_secs(700);
        assert_eq!(
            fail(&limiter, ip, "y", false, later),
            FailureOutcome::Delay(Duration::ZERO)
        );
        for _ in 0..10 {
            let attempt = begin(&limiter, ip, "z", None, later).unwrap();
            limiter.abandoned(attempt);
        }
        assert_eq!(
            fail(&limiter, ip, "w", false, later),
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
            fail(&limiter, phone, "alice@example.com", true, now);
            fail(&limiter, attacker, "bob@example.com", true, now);
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
        fail(&limiter, attacker, "bob@example.com", true, now);
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
            fail(&limiter, ip, "x", false, now);
        }
        assert!(limiter.is_locked_out_at("2001:db8:1:2::ffff".parse().unwrap(), now));
        assert!(!limiter.is_locked_out_at("2001:db8:1:3::1".parse().unwrap(), now));
    }
}
