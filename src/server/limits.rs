//! Admission control for connections, decided by the acceptor before a
//! worker is involved. A permit is held for the life of the session and
//! released when dropped.
//!
//! - A total (`limits.max_sessions`, the worker threads), of which port 25
//!   may never take the last `limits.submission_reserved`: strangers
//!   flooding the MX port cannot keep users from sending.
//! - Per client (an IPv4 address, or an IPv6 /64, which one host owns):
//!   at most `limits.max_sessions_per_ip` at once, and at most
//!   `limits.max_connection_rate` new connections a minute.
//! - Clients in `relay.trusted_networks` are exempt from the per-client
//!   limits (as Postfix's anvil exempts $mynetworks): they are our own
//!   applications, which may open many connections on purpose.
//! - Local sessions (`petrel sendmail` over `submit.sock`, and maildrop
//!   replays) have a share of their own, `limits.max_local_sessions`, with
//!   workers of their own, and at most `limits.max_local_sessions_per_user`
//!   per uid: a local user who opens hundreds of them takes nothing from
//!   TCP clients, and is never counted as 127.0.0.1.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use crate::auth::limiter::client_key;
use crate::protocol::session::ListenerKind;

/// Beyond this many clients with a rate history, the idle ones are forgotten.
const PRUNE_RATES_ABOVE: usize = 10_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Every worker is busy.
    ServerBusy,
    /// Port 25 has used its share; the rest is kept for submission.
    ListenerFull,
    /// This client already has `max_sessions_per_ip` sessions.
    TooManyFromAddress,
    /// This client opened more than `max_connection_rate` a minute.
    TooFast,
    /// Local sessions have used their share.
    LocalFull,
    /// This local user already has `max_local_per_user` sessions.
    TooManyFromUser,
}

impl Refusal {
    /// What the log says.
    pub fn describe(self) -> &'static str {
        match self {
            Refusal::ServerBusy => "every session slot is in use",
            Refusal::ListenerFull => "port 25 has used its share of the sessions",
            Refusal::TooManyFromAddress => "too many sessions from this address",
            Refusal::TooFast => "too many connections a minute from this address",
            Refusal::LocalFull => "every local session slot is in use",
            Refusal::TooManyFromUser => "too many local sessions of this user",
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub struct LimitSettings {
    pub max_total: usize,
    /// Sessions port 25 may hold at most.
    pub max_smtp: usize,
    pub max_per_client: usize,
    /// New connections per minute per client; 0: no limit.
    pub per_minute: u32,
    /// Local sessions at once, besides `max_total` ...
    pub max_local: usize,
    /// ... and per uid.
    pub max_local_per_user: usize,
}

/// A token bucket: `per_minute` tokens, refilled continuously.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    updated: Instant,
}

#[derive(Debug, Default)]
struct Counts {
    total: usize,
    smtp: usize,
    per_client: HashMap<IpAddr, usize>,
    rates: HashMap<IpAddr, Bucket>,
    local: usize,
    per_user: HashMap<u32, usize>,
}

#[derive(Debug)]
pub struct ConnectionLimits {
    settings: LimitSettings,
    counts: Mutex<Counts>,
}

impl ConnectionLimits {
    pub fn new(settings: LimitSettings) -> Arc<ConnectionLimits> {
        Arc::new(ConnectionLimits {
            settings,
            counts: Mutex::new(Counts::default()),
        })
    }

    /// `exempt`: the client is in a trusted network.
    pub fn try_acquire(
        self: &Arc<Self>,
        ip: IpAddr,
        listener: ListenerKind,
        exempt: bool,
    ) -> Result<Permit, Refusal> {
        self.try_acquire_at(ip, listener, exempt, Instant::now())
    }

    fn try_acquire_at(
        self: &Arc<Self>,
        ip: IpAddr,
        listener: ListenerKind,
        exempt: bool,
        now: Instant,
    ) -> Result<Permit, Refusal> {
        let client = client_key(ip);
        let settings = self.settings;
        let mut counts = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        if counts.total >= settings.max_total {
            return Err(Refusal::ServerBusy);
        }
        let smtp = listener == ListenerKind::Smtp;
        if smtp && counts.smtp >= settings.max_smtp {
            return Err(Refusal::ListenerFull);
        }
        if !exempt {
            let from_client = counts.per_client.get(&client).copied().unwrap_or(0);
            if from_client >= settings.max_per_client {
                return Err(Refusal::TooManyFromAddress);
            }
            if settings.per_minute > 0 && !take_token(&mut counts, client, settings.per_minute, now)
            {
                return Err(Refusal::TooFast);
            }
        }
        counts.total += 1;
        if smtp {
            counts.smtp += 1;
        }
        *counts.per_client.entry(client).or_default() += 1;
        Ok(Permit {
            limits: Arc::clone(self),
            holder: Holder::Client { client, smtp },
        })
    }

    /// A local session of `uid`: its own share, never a TCP client's.
    pub fn try_acquire_local(self: &Arc<Self>, uid: u32) -> Result<Permit, Refusal> {
        let settings = self.settings;
        let mut counts = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        if counts.local >= settings.max_local {
            return Err(Refusal::LocalFull);
        }
        let of_user = counts.per_user.get(&uid).copied().unwrap_or(0);
        if of_user >= settings.max_local_per_user {
            return Err(Refusal::TooManyFromUser);
        }
        counts.local += 1;
        *counts.per_user.entry(uid).or_default() += 1;
        Ok(Permit {
            limits: Arc::clone(self),
            holder: Holder::Local { uid },
        })
    }

    /// Sessions running now, local ones included.
    pub fn active(&self) -> usize {
        let counts = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        counts.total + counts.local
    }

    fn release(&self, holder: Holder) {
        let mut counts = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        match holder {
            Holder::Client { client, smtp } => {
                counts.total = counts.total.saturating_sub(1);
                if smtp {
                    counts.smtp = counts.smtp.saturating_sub(1);
                }
                decrement(&mut counts.per_client, &client);
            }
            Holder::Local { uid } => {
                counts.local = counts.local.saturating_sub(1);
                decrement(&mut counts.per_user, &uid);
            }
        }
    }
}

fn decrement<K: Eq + std::hash::Hash>(table: &mut HashMap<K, usize>, key: &K) {
    if let Some(n) = table.get_mut(key) {
        *n = n.saturating_sub(1);
        if *n == 0 {
            table.remove(key);
        }
    }
}

fn take_token(counts: &mut Counts, client: IpAddr, per_minute: u32, now: Instant) -> bool {
    let capacity = f64::from(per_minute);
    if counts.rates.len() > PRUNE_RATES_ABOVE {
        // A full bucket says nothing: forget it.
        counts.rates.retain(|_, bucket| {
            let refill = now.duration_since(bucket.updated).as_secs_f64() * capacity / 60.0;
            bucket.tokens + refill < capacity
        });
    }
    let bucket = counts.rates.entry(client).or_insert(Bucket {
        tokens: capacity,
        updated: now,
    });
    let refill = now.duration_since(bucket.updated).as_secs_f64() * capacity / 60.0;
    bucket.tokens = (bucket.tokens + refill).min(capacity);
    bucket.updated = now;
    if bucket.tokens >= 1.0 {
        bucket.tokens -= 1.0;
        true
    } else {
        false
    }
}

/// Who holds a permit.
#[derive(Debug, Clone, Copy)]
enum Holder {
    Client { client: IpAddr, smtp: bool },
    Local { uid: u32 },
}

/// One admitted connection; dropping it frees the slot.
#[derive(Debug)]
pub struct Permit {
    limits: Arc<ConnectionLimits>,
    holder: Holder,
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.limits.release(self.holder);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn limits(
        max_total: usize,
        max_smtp: usize,
        max_per_client: usize,
        per_minute: u32,
    ) -> Arc<ConnectionLimits> {
        ConnectionLimits::new(LimitSettings {
            max_total,
            max_smtp,
            max_per_client,
            per_minute,
            max_local: 4,
            max_local_per_user: 2,
        })
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn per_client_and_total_limits() {
        let limits = limits(3, 3, 2, 0);
        let smtp = ListenerKind::Smtp;
        let p1 = limits.try_acquire(ip("192.0.2.1"), smtp, false).unwrap();
        let _p2 = limits.try_acquire(ip("192.0.2.1"), smtp, false).unwrap();
        assert_eq!(
            limits
                .try_acquire(ip("192.0.2.1"), smtp, false)
                .unwrap_err(),
            Refusal::TooManyFromAddress
        );
        let _p3 = limits.try_acquire(ip("192.0.2.2"), smtp, false).unwrap();
        assert_eq!(
            limits
                .try_acquire(ip("192.0.2.3"), smtp, false)
                .unwrap_err(),
            Refusal::ServerBusy
        );
        drop(p1);
        assert_eq!(limits.active(), 2);
        let _p4 = limits.try_acquire(ip("192.0.2.1"), smtp, false).unwrap();
        // An IPv4-mapped IPv6 address is the same client.
        assert_eq!(
            limits
                .try_acquire(ip("::ffff:192.0.2.1"), smtp, false)
                .unwrap_err(),
            Refusal::ServerBusy
        );
    }

    #[test]
    fn port_25_cannot_take_the_submission_reserve() {
        let limits = limits(4, 2, 10, 0);
        let _a = limits
            .try_acquire(ip("192.0.2.1"), ListenerKind::Smtp, false)
            .unwrap();
        let _b = limits
            .try_acquire(ip("192.0.2.2"), ListenerKind::Smtp, false)
            .unwrap();
        assert_eq!(
            limits
                .try_acquire(ip("192.0.2.3"), ListenerKind::Smtp, false)
                .unwrap_err(),
            Refusal::ListenerFull
        );
        let _c = limits
            .try_acquire(ip("192.0.2.3"), ListenerKind::Submission, false)
            .unwrap();
        let _d = limits
            .try_acquire(ip("192.0.2.4"), ListenerKind::Smtps, false)
            .unwrap();
        assert_eq!(
            limits
                .try_acquire(ip("192.0.2.5"), ListenerKind::Smtps, false)
                .unwrap_err(),
            Refusal::ServerBusy
        );
    }

    #[test]
    fn local_sessions_have_their_own_share_and_a_limit_per_user() {
        let limits = limits(2, 2, 1, 0);
        let held: Vec<Permit> = (0..2)
            .map(|_| limits.try_acquire_local(1000).unwrap())
            .collect();
        assert_eq!(
            limits.try_acquire_local(1000).unwrap_err(),
            Refusal::TooManyFromUser
        );
        let _other = limits.try_acquire_local(1001).unwrap();
        let _third = limits.try_acquire_local(1002).unwrap();
        assert_eq!(
            limits.try_acquire_local(1003).unwrap_err(),
            Refusal::LocalFull
        );
        // TCP clients, 127.0.0.1 included, still have every slot.
        let _a = limits
            .try_acquire(ip("127.0.0.1"), ListenerKind::Submission, false)
            .unwrap();
        let _b = limits
            .try_acquire(ip("192.0.2.1"), ListenerKind::Smtp, false)
            .unwrap();
        assert_eq!(limits.active(), 6);
        drop(held);
        assert!(limits.try_acquire_local(1000).is_ok());
    }

    #[test]
    fn ipv6_clients_are_counted_per_64() {
        let limits = limits(100, 100, 2, 0);
        let _a = limits
            .try_acquire(ip("2001:db8:1:2::1"), ListenerKind::Smtp, false)
            .unwrap();
        let _b = limits
            .try_acquire(ip("2001:db8:1:2::2"), ListenerKind::Smtp, false)
            .unwrap();
        assert_eq!(
            limits
                .try_acquire(ip("2001:db8:1:2:ffff::3"), ListenerKind::Smtp, false)
                .unwrap_err(),
            Refusal::TooManyFromAddress
        );
        assert!(
            limits
                .try_acquire(ip("2001:db8:1:3::1"), ListenerKind::Smtp, false)
                .is_ok()
        );
    }

    #[test]
    fn connection_rate_per_client_refills_over_time() {
        let limits = limits(100, 100, 100, 6);
        let client = ip("192.0.2.1");
        let now = Instant::now();
        for _ in 0..6 {
            drop(
                limits
                    .try_acquire_at(client, ListenerKind::Smtp, false, now)
                    .unwrap(),
            );
        }
        assert_eq!(
            limits
                .try_acquire_at(client, ListenerKind::Smtp, false, now)
                .unwrap_err(),
            Refusal::TooFast
        );
        assert!(
            limits
                .try_acquire_at(ip("192.0.2.2"), ListenerKind::Smtp, false, now)
                .is_ok()
        );
        // Six a minute: one more after ten seconds.
        let later = now + Duration::from_secs(10);
        assert!(
            limits
                .try_acquire_at(client, ListenerKind::Smtp, false, later)
                .is_ok()
        );
        assert!(
            limits
                .try_acquire_at(client, ListenerKind::Smtp, false, later)
                .is_err()
        );
        // Trusted networks are not rate limited.
        assert!(
            limits
                .try_acquire_at(client, ListenerKind::Smtp, true, later)
                .is_ok()
        );
    }
}
