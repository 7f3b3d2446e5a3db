//! The gate before a session on the MX port, in the spirit of Postfix's
//! postscreen: a client that talks before the greeting ends is a bot, and
//! a client whose DNS blocklist weights reach the threshold is refused,
//! before any session (and any thread's worth of SMTP) is spent on it.
//!
//! This module decides; the server's IO loop does the waiting and the
//! talking. Never for `relay.trusted_networks`, the submission ports or
//! local programs; loopback clients only when `antispam.check_loopback`.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::config::{AntispamConfig, Blocklist, Config, RelayConfig};
use crate::dns::{Dns, DnsFailure};
use crate::protocol::reply::{self, Reply};
use crate::protocol::session::ListenerKind;

/// Clients remembered as having passed the pregreet test, at most: a
/// stranger's addresses must not grow the table without end.
const MAX_PASSED: usize = 100_000;
/// Blocklist verdicts kept (for their TTL), at most.
const MAX_VERDICTS: usize = 10_000;
/// A verdict is reused for its answers' TTL, and never longer than this.
const LONGEST_REUSE: Duration = Duration::from_secs(3600);

/// What the lists say of a client.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Listing {
    /// The weights of the lists that named it, added up.
    pub score: i32,
    /// The zones with a positive weight that named it, in config order.
    pub listed_by: Vec<String>,
}

/// How a client is screened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Screening {
    /// Not at all: trusted, loopback, a submission port, or nothing to do.
    Skip,
    /// `pregreet`: greet in two lines and wait in between. `dnsbl`: ask
    /// the lists.
    Screen { pregreet: bool, dnsbl: bool },
}

pub struct Gate {
    settings: AntispamConfig,
    lists: Vec<Blocklist>,
    relay: RelayConfig,
    dns: Option<Arc<Dns>>,
    /// Clients that passed the pregreet test, and until when it holds.
    passed: Mutex<HashMap<IpAddr, Instant>>,
    /// Blocklist verdicts, and until when they may be reused.
    verdicts: Mutex<HashMap<IpAddr, (Listing, Instant)>>,
    /// Lists already reported as refusing our resolver.
    refusing: Mutex<HashSet<String>>,
}

impl Gate {
    /// `dns`: `None` in setups with no resolver (the lists are not asked).
    /// The config was validated: its lists parse.
    pub fn new(config: &Config, dns: Option<Arc<Dns>>) -> Gate {
        let lists = config
            .antispam
            .dnsbl
            .iter()
            .filter_map(|text| Blocklist::parse(text).ok())
            .collect();
        Gate {
            settings: config.antispam.clone(),
            lists,
            relay: config.relay.clone(),
            dns,
            passed: Mutex::new(HashMap::new()),
            verdicts: Mutex::new(HashMap::new()),
            refusing: Mutex::new(HashSet::new()),
        }
    }

    pub fn greet_wait(&self) -> Duration {
        self.settings.greet_wait.get()
    }

    /// Whether and how a client from `ip` on `listener` is screened.
    pub fn screening(&self, ip: IpAddr, listener: ListenerKind) -> Screening {
        let exempt = listener != ListenerKind::Smtp
            || self.relay.is_trusted(ip)
            || (ip.is_loopback() && !self.settings.check_loopback);
        let pregreet = self.settings.pregreet && !self.passed_recently(ip);
        let dnsbl = !self.lists.is_empty() && self.dns.is_some();
        if exempt || !(pregreet || dnsbl) {
            return Screening::Skip;
        }
        Screening::Screen { pregreet, dnsbl }
    }

    fn passed_recently(&self, ip: IpAddr) -> bool {
        let passed = self.passed.lock().unwrap_or_else(PoisonError::into_inner);
        passed
            .get(&client_key(ip))
            .is_some_and(|until| Instant::now() < *until)
    }

    /// The client waited for the greeting: greeted at once for `pass_ttl`.
    pub fn passed_pregreet(&self, ip: IpAddr) {
        let until = Instant::now() + self.settings.pass_ttl.get();
        let mut passed = self.passed.lock().unwrap_or_else(PoisonError::into_inner);
        remember(&mut passed, client_key(ip), until, MAX_PASSED);
    }

    /// What the lists say of `ip`, asked all at once within
    /// `dnsbl_timeout`, or reused within the answers' TTL. A list that
    /// did not answer counts as not listing the client (logged).
    pub fn listing(&self, ip: IpAddr) -> Listing {
        let Some(dns) = &self.dns else {
            return Listing::default();
        };
        let ip = crate::config::canonical_ip(ip);
        if let Some(listing) = self.reusable(ip) {
            return listing;
        }
        let names = self.lists.iter().map(|list| list.query_name(ip)).collect();
        let answers = dns.a_records_together(names, self.settings.dnsbl_timeout.get());
        let mut listing = Listing::default();
        let mut reuse = Some(LONGEST_REUSE);
        for (list, answer) in self.lists.iter().zip(answers) {
            match answer {
                Ok((addresses, ttl)) => {
                    reuse = reuse.map(|reuse| reuse.min(ttl));
                    if self.names_client(list, &addresses) {
                        listing.score += list.weight;
                        if list.weight > 0 {
                            listing.listed_by.push(list.zone.clone());
                        }
                    }
                }
                Err(failure) => {
                    reuse = None;
                    log_unanswered(list, ip, &failure);
                }
            }
        }
        if let Some(reuse) = reuse.filter(|reuse| !reuse.is_zero()) {
            let mut verdicts = self.verdicts.lock().unwrap_or_else(PoisonError::into_inner);
            remember(
                &mut verdicts,
                ip,
                (listing.clone(), Instant::now() + reuse),
                MAX_VERDICTS,
            );
        }
        listing
    }

    fn reusable(&self, ip: IpAddr) -> Option<Listing> {
        let verdicts = self.verdicts.lock().unwrap_or_else(PoisonError::into_inner);
        verdicts
            .get(&ip)
            .filter(|(_, until)| Instant::now() < *until)
            .map(|(listing, _)| listing.clone())
    }

    /// Whether `addresses` (a list's answer) name the client. Answers in
    /// 127.255.255.0/24 are the list refusing our resolver (Spamhaus does
    /// so for public resolvers): not a listing, and a configuration
    /// problem, logged once per list.
    fn names_client(&self, list: &Blocklist, addresses: &[Ipv4Addr]) -> bool {
        let (refused, answers): (Vec<Ipv4Addr>, Vec<Ipv4Addr>) = addresses
            .iter()
            .partition(|address| address.octets()[..3] == [127, 255, 255]);
        if let Some(code) = refused.first() {
            let mut refusing = self.refusing.lock().unwrap_or_else(PoisonError::into_inner);
            if refusing.insert(list.zone.clone()) {
                log::warn!(
                    "antispam: {} answered {code}: it refuses queries from this server's \
                     resolver (a public resolver, or over its free use); its answers are ignored. \
                     Use a resolver of your own for dns.nameservers, or the list's paid service",
                    list.zone
                );
            }
        }
        answers.iter().any(|answer| list.counts(*answer))
    }

    /// Whether `listing` keeps the client out.
    pub fn refuses(&self, listing: &Listing) -> bool {
        !self.lists.is_empty() && listing.score >= self.settings.dnsbl_threshold
    }
}

/// The reply to a client the lists keep out, as Postfix words it.
pub fn blocked_reply(ip: IpAddr, listing: &Listing) -> Reply {
    let list = listing
        .listed_by
        .first()
        .map(String::as_str)
        .unwrap_or("DNS lists");
    Reply::new(
        reply::CLIENT_REFUSED,
        format!("Service unavailable; client [{ip}] blocked using {list}"),
    )
}

/// The reply to a client that talked before the greeting ended.
pub fn pregreet_reply(ip: IpAddr) -> Reply {
    Reply::new(
        reply::CLIENT_REFUSED,
        format!("Service unavailable; client [{ip}] talked before the greeting"),
    )
}

fn log_unanswered(list: &Blocklist, ip: IpAddr, failure: &DnsFailure) {
    log::warn!(
        "antispam: {} gave no answer for [{ip}] ({failure}); counted as not listing it",
        list.zone
    );
}

/// IPv6 clients are one per /64: a host is given a whole /64 and may use
/// any address in it.
fn client_key(ip: IpAddr) -> IpAddr {
    match crate::config::canonical_ip(ip) {
        IpAddr::V6(v6) => {
            let mut octets = v6.octets();
            octets[8..].fill(0);
            IpAddr::from(octets)
        }
        v4 => v4,
    }
}

/// Inserts into a table of at most `max` entries with an expiry, dropping
/// the expired ones when it is full; past that, the new entry is not kept.
fn remember<V>(table: &mut HashMap<IpAddr, V>, key: IpAddr, value: V, max: usize)
where
    V: Expiring,
{
    if table.len() >= max {
        let now = Instant::now();
        table.retain(|_, value| value.until() > now);
    }
    if table.len() < max || table.contains_key(&key) {
        table.insert(key, value);
    }
}

trait Expiring {
    fn until(&self) -> Instant;
}

impl Expiring for Instant {
    fn until(&self) -> Instant {
        *self
    }
}

impl Expiring for (Listing, Instant) {
    fn until(&self) -> Instant {
        self.1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn who_is_screened() {
        let mut config = Config::default();
        config.relay.trusted_networks = vec!["10.0.0.0/8".parse().unwrap()];
        let gate = Gate::new(&config, None);
        let stranger: IpAddr = "192.0.2.7".parse().unwrap();
        let screened = Screening::Screen {
            pregreet: true,
            dnsbl: false,
        };
        assert_eq!(gate.screening(stranger, ListenerKind::Smtp), screened);
        for (ip, listener) in [
            ("10.1.2.3", ListenerKind::Smtp),
            ("127.0.0.1", ListenerKind::Smtp),
            ("192.0.2.7", ListenerKind::Submission),
            ("192.0.2.7", ListenerKind::Smtps),
            ("192.0.2.7", ListenerKind::Local),
        ] {
            assert_eq!(
                gate.screening(ip.parse().unwrap(), listener),
                Screening::Skip,
                "{ip} {listener:?}"
            );
        }
        // Passed once: greeted at once, the whole /64 for IPv6.
        gate.passed_pregreet(stranger);
        assert_eq!(
            gate.screening(stranger, ListenerKind::Smtp),
            Screening::Skip
        );
        gate.passed_pregreet("2001:db8:1:2::5".parse().unwrap());
        assert_eq!(
            gate.screening("2001:db8:1:2:ffff::9".parse().unwrap(), ListenerKind::Smtp),
            Screening::Skip
        );
        assert_eq!(
            gate.screening("2001:db8:1:3::5".parse().unwrap(), ListenerKind::Smtp),
            screened
        );
        config.antispam.check_loopback = true;
        let gate = Gate::new(&config, None);
        assert_eq!(
            gate.screening("127.0.0.1".parse().unwrap(), ListenerKind::Smtp),
            screened
        );
    }

    #[test]
    fn refused_answers_are_no_listing() {
        let mut config = Config::default();
        config.antispam.dnsbl = vec!["zen.example.test".into()];
        let gate = Gate::new(&config, None);
        let list = &gate.lists[0];
        assert!(!gate.names_client(list, &[Ipv4Addr::new(127, 255, 255, 254)]));
        assert!(gate.names_client(list, &[Ipv4Addr::new(127, 0, 0, 2)]));
        assert!(gate.names_client(
            list,
            &[
                Ipv4Addr::new(127, 255, 255, 254),
                Ipv4Addr::new(127, 0, 0, 4)
            ]
        ));
    }

    #[test]
    fn the_tables_stay_bounded() {
        let mut table = HashMap::new();
        let later = Instant::now() + Duration::from_secs(60);
        for n in 0..10u8 {
            remember(&mut table, IpAddr::from([192, 0, 2, n]), later, 4);
        }
        assert_eq!(table.len(), 4);
        // Expired entries make room.
        let mut table: HashMap<IpAddr, Instant> = (0..4u8)
            .map(|n| (IpAddr::from([192, 0, 2, n]), Instant::now()))
            .collect();
        remember(&mut table, IpAddr::from([198, 51, 100, 1]), later, 4);
        assert!(table.contains_key(&IpAddr::from([198, 51, 100, 1])));
    }
}
