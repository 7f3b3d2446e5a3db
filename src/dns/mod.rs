//! DNS for mail routing and address verification: a small blocking facade
//! over `hickory-resolver` (the maintained successor of
//! `trust-dns-resolver`). hickory is async-only, so one small tokio
//! runtime with a single thread serves every lookup; callers on worker
//! threads block on the result.
//!
//! Owns the rules of RFC 5321 5.1 (MX, then A/AAAA as an implicit MX) and
//! RFC 7505 (null MX). Never decides policy.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use hickory_resolver::TokioResolver;
use hickory_resolver::config::{NameServerConfig, ResolveHosts, ResolverConfig, ResolverOpts};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::net::{DnsError, NetError};
use hickory_resolver::proto::op::ResponseCode;
use hickory_resolver::proto::rr::RData;

use crate::config::{AddressFamily, DnsConfig};

/// How long a verification verdict (or a TXT answer) is reused; short,
/// so a fixed DNS problem or a new record takes effect quickly.
const VERDICT_CACHE_TIME: Duration = Duration::from_secs(60);
const VERDICT_CACHE_MAX: usize = 10_000;
/// TXT answers kept: at most this many, each at most `MAX_CACHED_TXT`
/// octets (a 4096-bit DKIM key is under 1 KiB), so at most 8 MiB.
const TXT_CACHE_MAX: usize = 2_000;
const MAX_CACHED_TXT: usize = 4 * 1024;
/// Verification looks at the addresses of this many mail hosts at most, so
/// one MAIL FROM cannot make us send a long list of queries.
const MAX_VERIFIED_HOSTS: usize = 5;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DnsFailure {
    /// NXDOMAIN: permanent.
    NoSuchDomain,
    /// The domain exists but has no MX and no address: permanent.
    NoMailHosts,
    /// RFC 7505: the domain says it accepts no mail. Permanent.
    NullMx,
    /// SERVFAIL, timeout, unreachable resolver: try again later.
    Temporary(String),
}

impl DnsFailure {
    pub fn is_permanent(&self) -> bool {
        !matches!(self, DnsFailure::Temporary(_))
    }
}

impl std::fmt::Display for DnsFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DnsFailure::NoSuchDomain => f.write_str("domain does not exist (NXDOMAIN)"),
            DnsFailure::NoMailHosts => f.write_str("domain has no MX and no address records"),
            DnsFailure::NullMx => f.write_str("domain accepts no mail (null MX, RFC 7505)"),
            DnsFailure::Temporary(why) => write!(f, "temporary DNS failure: {why}"),
        }
    }
}

/// One host to try for a domain, in the order to try them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MailHost {
    pub name: String,
    pub preference: u16,
}

/// The addresses of a domain's mail hosts, or why there are none.
pub type MailAddresses = Result<Vec<IpAddr>, DnsFailure>;

crate::error::message_error!(DnsSetupError, "The resolver could not be set up.");

pub struct Dns {
    runtime: tokio::runtime::Runtime,
    resolver: TokioResolver,
    /// Bounds one lookup including retries, whatever the resolver does.
    deadline: Duration,
    verdicts: BriefCache<String, MailAddresses>,
    /// Forward-confirmed client names, briefly.
    names: BriefCache<IpAddr, Option<String>>,
    /// TXT answers (SPF, DKIM, DMARC, MTA-STS records): every inbound
    /// message asks for a few, mostly the same ones, and a hit here costs
    /// no trip to the resolver's thread.
    /// Only answers up to [`MAX_CACHED_TXT`] octets, in fewer entries: a
    /// stranger picks the names (SPF includes, DKIM selectors), so the
    /// cache must not become a store for whatever they publish.
    texts: BriefCache<String, Vec<String>>,
}

/// Classification of one resolver error.
enum LookupError {
    NxDomain,
    NoRecords,
    Temporary(String),
}

fn classify(error: &NetError) -> LookupError {
    match error {
        NetError::Dns(DnsError::NoRecordsFound(no_records)) => {
            if no_records.response_code == ResponseCode::NXDomain {
                LookupError::NxDomain
            } else {
                LookupError::NoRecords
            }
        }
        other => LookupError::Temporary(other.to_string()),
    }
}

impl Dns {
    /// `dns.nameservers`, or the system's resolv.conf when that is empty.
    pub fn new(config: &DnsConfig) -> Result<Dns, DnsSetupError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("dns")
            .enable_all()
            .build()
            .map_err(|e| DnsSetupError(format!("cannot start the DNS runtime: {e}")))?;
        let resolver = {
            let _context = runtime.enter();
            let provider = TokioRuntimeProvider::default();
            let mut builder = if config.nameservers.is_empty() {
                TokioResolver::builder(provider).map_err(|e| {
                    DnsSetupError(format!(
                        "cannot read the system resolver configuration: {e}"
                    ))
                })?
            } else {
                let servers = config
                    .nameservers
                    .iter()
                    .map(|address| {
                        let mut server = NameServerConfig::udp_and_tcp(address.ip());
                        for connection in &mut server.connections {
                            connection.port = address.port();
                        }
                        server
                    })
                    .collect();
                TokioResolver::builder_with_config(
                    ResolverConfig::from_name_servers(servers),
                    provider,
                )
            };
            let options: &mut ResolverOpts = builder.options_mut();
            options.timeout = config.timeout.get();
            options.attempts = 2;
            // Mail routing follows DNS alone, as Postfix's smtp_host_lookup=dns.
            options.use_hosts_file = ResolveHosts::Never;
            options.ndots = 0;
            builder
                .build()
                .map_err(|e| DnsSetupError(format!("cannot build the resolver: {e}")))?
        };
        Ok(Dns {
            runtime,
            resolver,
            deadline: config.timeout.get() * 3,
            verdicts: BriefCache::new(VERDICT_CACHE_MAX),
            names: BriefCache::new(VERDICT_CACHE_MAX),
            texts: BriefCache::new(TXT_CACHE_MAX),
        })
    }

    /// Runs a lookup on the DNS thread (whose stack suits hickory's large
    /// futures) and waits for it, within the deadline.
    fn run<T: Send + 'static>(
        &self,
        lookup: impl Future<Output = Result<T, NetError>> + Send + 'static,
    ) -> Result<T, LookupError> {
        let deadline = self.deadline;
        let task = self
            .runtime
            .spawn(async move { tokio::time::timeout(deadline, lookup).await });
        match self.runtime.block_on(task) {
            Ok(Ok(Ok(value))) => Ok(value),
            Ok(Ok(Err(error))) => Err(classify(&error)),
            Ok(Err(_elapsed)) => Err(LookupError::Temporary("lookup timed out".into())),
            Err(join) => Err(LookupError::Temporary(format!(
                "lookup task failed: {join}"
            ))),
        }
    }

    /// Where mail for `domain` goes: MX hosts by preference (random order
    /// among equal preferences), or the domain itself when it has no MX but
    /// has an address (RFC 5321 5.1).
    pub fn mail_hosts(&self, domain: &str) -> Result<Vec<MailHost>, DnsFailure> {
        match self.mx_records(domain) {
            Ok(mut hosts) => {
                // RFC 7505: a lone MX with an empty target (".") means
                // "no mail here"; mixed with real MXes it is ignored.
                let null = |host: &MailHost| host.name.is_empty();
                if !hosts.is_empty() && hosts.iter().all(null) {
                    return Err(DnsFailure::NullMx);
                }
                hosts.retain(|host| !null(host));
                if hosts.is_empty() {
                    return self.implicit_mx(domain);
                }
                order_by_preference(&mut hosts, random_u64);
                Ok(hosts)
            }
            Err(LookupError::NxDomain) => Err(DnsFailure::NoSuchDomain),
            Err(LookupError::NoRecords) => self.implicit_mx(domain),
            Err(LookupError::Temporary(why)) => Err(DnsFailure::Temporary(why)),
        }
    }

    fn implicit_mx(&self, domain: &str) -> Result<Vec<MailHost>, DnsFailure> {
        match self.addresses(domain, AddressFamily::Any) {
            Ok(_) => Ok(vec![MailHost {
                name: domain.to_string(),
                preference: 0,
            }]),
            Err(DnsFailure::NoMailHosts) => Err(DnsFailure::NoMailHosts),
            Err(other) => Err(other),
        }
    }

    /// Addresses of a host: IPv6 first, then IPv4, unless the family is
    /// restricted. An address literal is returned as is.
    pub fn addresses(&self, host: &str, family: AddressFamily) -> Result<Vec<IpAddr>, DnsFailure> {
        if let Ok(ip) = host.parse::<IpAddr>() {
            return Ok(vec![ip]);
        }
        // RFC 6761 6.3: "localhost" is loopback without asking anyone
        // (a smart host on the same machine is a common setup).
        if host.trim_end_matches('.').eq_ignore_ascii_case("localhost") {
            let v4 = IpAddr::from([127, 0, 0, 1]);
            let v6 = IpAddr::from(std::net::Ipv6Addr::LOCALHOST);
            return Ok(match family {
                AddressFamily::Any => vec![v4, v6],
                AddressFamily::Ipv4 => vec![v4],
                AddressFamily::Ipv6 => vec![v6],
            });
        }
        let families: &[bool] = match family {
            AddressFamily::Any => &[true, false],
            AddressFamily::Ipv6 => &[true],
            AddressFamily::Ipv4 => &[false],
        };
        let mut found = Vec::new();
        let mut temporary = None;
        let mut nxdomain = false;
        for &ipv6 in families {
            match self.lookup_addresses(host, ipv6) {
                Ok(addresses) => found.extend(addresses),
                Err(LookupError::NxDomain) => {
                    nxdomain = true;
                    break;
                }
                Err(LookupError::NoRecords) => {}
                Err(LookupError::Temporary(why)) => temporary = Some(why),
            }
        }
        if !found.is_empty() {
            return Ok(found);
        }
        match (temporary, nxdomain) {
            (Some(why), _) => Err(DnsFailure::Temporary(why)),
            (None, true) => Err(DnsFailure::NoSuchDomain),
            (None, false) => Err(DnsFailure::NoMailHosts),
        }
    }

    /// AAAA (`ipv6`) or A records of one host.
    fn lookup_addresses(&self, host: &str, ipv6: bool) -> Result<Vec<IpAddr>, LookupError> {
        let resolver = self.resolver.clone();
        let name = fqdn(host);
        let records = if ipv6 {
            self.run(async move { resolver.ipv6_lookup(name).await })?
        } else {
            self.run(async move { resolver.ipv4_lookup(name).await })?
        };
        Ok(records
            .answers()
            .iter()
            .filter_map(|record| match &record.data {
                RData::AAAA(aaaa) => Some(IpAddr::V6(aaaa.0)),
                RData::A(a) => Some(IpAddr::V4(a.0)),
                _ => None,
            })
            .collect())
    }

    /// The addresses of a domain's mail hosts (the first few hosts), for
    /// address verification at MAIL and RCPT time: does the domain accept
    /// mail, and could we ever deliver to it? Verdicts other than temporary
    /// failures are cached briefly.
    pub fn mail_addresses(&self, domain: &str) -> MailAddresses {
        let key = domain.to_lowercase();
        if let Some(verdict) = self.verdicts.get(&key) {
            return verdict;
        }
        let verdict = self.look_up_mail_addresses(domain);
        if let Err(DnsFailure::Temporary(why)) = &verdict {
            log::warn!("dns: {domain}: {why}");
            return verdict;
        }
        self.verdicts.put(key, verdict.clone());
        verdict
    }

    fn look_up_mail_addresses(&self, domain: &str) -> MailAddresses {
        let hosts = self.mail_hosts(domain)?;
        let mut found = Vec::new();
        let mut temporary = None;
        for host in hosts.iter().take(MAX_VERIFIED_HOSTS) {
            match self.addresses(&host.name, AddressFamily::Any) {
                Ok(addresses) => found.extend(addresses),
                Err(DnsFailure::Temporary(why)) => temporary = Some(why),
                Err(_) => {}
            }
        }
        match (found.is_empty(), temporary) {
            (false, _) => Ok(found),
            (true, Some(why)) => Err(DnsFailure::Temporary(why)),
            // MX records naming hosts that do not exist.
            (true, None) => Err(DnsFailure::NoMailHosts),
        }
    }
}

impl Dns {
    /// The client's name if its reverse DNS is forward-confirmed (a PTR
    /// name whose A/AAAA records include the address), as Postfix shows in
    /// `client=` and its logs; `None` otherwise. Cached briefly.
    pub fn client_name(&self, ip: IpAddr) -> Option<String> {
        if let Some(name) = self.names.get(&ip) {
            return name;
        }
        let name = self.confirmed_name(ip);
        self.names.put(ip, name.clone());
        name
    }

    /// The PTR names of an address (at most a few); empty when it has none.
    pub fn reverse_names(&self, ip: IpAddr) -> Result<Vec<String>, DnsFailure> {
        let resolver = self.resolver.clone();
        let arpa = hickory_resolver::proto::rr::Name::from(ip);
        match self.run(async move { resolver.reverse_lookup(arpa).await }) {
            Ok(lookup) => Ok(lookup
                .answers()
                .iter()
                .filter_map(|record| match &record.data {
                    RData::PTR(ptr) => Some(ptr.0.to_utf8().trim_end_matches('.').to_string()),
                    _ => None,
                })
                .take(3)
                .collect()),
            Err(LookupError::NxDomain | LookupError::NoRecords) => Ok(Vec::new()),
            Err(LookupError::Temporary(why)) => Err(DnsFailure::Temporary(why)),
        }
    }

    /// The exchanges of `domain`'s MX records as published (SPF's `mx`
    /// mechanism: no implicit MX, no null-MX rule); empty when none.
    pub fn mx_names(&self, domain: &str) -> Result<Vec<String>, DnsFailure> {
        match self.mx_records(domain) {
            Ok(hosts) => Ok(hosts
                .into_iter()
                .map(|host| host.name)
                .filter(|name| !name.is_empty())
                .collect()),
            Err(LookupError::NxDomain | LookupError::NoRecords) => Ok(Vec::new()),
            Err(LookupError::Temporary(why)) => Err(DnsFailure::Temporary(why)),
        }
    }

    /// The MX records of `domain` as published (a null MX has an empty name).
    fn mx_records(&self, domain: &str) -> Result<Vec<MailHost>, LookupError> {
        let resolver = self.resolver.clone();
        let name = fqdn(domain);
        let lookup = self.run(async move { resolver.mx_lookup(name).await })?;
        Ok(lookup
            .answers()
            .iter()
            .filter_map(|record| match &record.data {
                RData::MX(mx) => Some(MailHost {
                    name: mx.exchange.to_utf8().trim_end_matches('.').to_string(),
                    preference: mx.preference,
                }),
                _ => None,
            })
            .collect())
    }

    /// The TXT records at `name`, each with its strings joined (RFC 7208
    /// 3.3); empty when the name has none or does not exist.
    pub fn txt(&self, name: &str) -> Result<Vec<String>, DnsFailure> {
        let key = name.trim_end_matches('.').to_ascii_lowercase();
        if let Some(texts) = self.texts.get(&key) {
            return Ok(texts);
        }
        let texts = self.look_up_txt(name)?;
        if worth_caching(&texts) {
            self.texts.put(key, texts.clone());
        }
        Ok(texts)
    }

    fn look_up_txt(&self, name: &str) -> Result<Vec<String>, DnsFailure> {
        let resolver = self.resolver.clone();
        let name = fqdn(name);
        match self.run(async move { resolver.txt_lookup(name).await }) {
            Ok(lookup) => Ok(lookup
                .answers()
                .iter()
                .filter_map(|record| match &record.data {
                    RData::TXT(txt) => Some(
                        txt.txt_data
                            .iter()
                            .map(|part| String::from_utf8_lossy(part).into_owned())
                            .collect::<String>(),
                    ),
                    _ => None,
                })
                .collect()),
            Err(LookupError::NxDomain | LookupError::NoRecords) => Ok(Vec::new()),
            Err(LookupError::Temporary(why)) => Err(DnsFailure::Temporary(why)),
        }
    }

    /// The IPv4 addresses at each of `names`, asked all at once with one
    /// deadline for them all (DNS blocklists: a client under every list).
    /// A name with no records gives an empty list; one that has not
    /// answered by the deadline, a temporary failure. Each answer comes
    /// with how long it may be reused (its TTL).
    pub fn a_records_together(
        &self,
        names: Vec<String>,
        within: Duration,
    ) -> Vec<Result<(Vec<std::net::Ipv4Addr>, Duration), DnsFailure>> {
        let count = names.len();
        let resolver = self.resolver.clone();
        let task = self.runtime.spawn(async move {
            let mut lookups = tokio::task::JoinSet::new();
            for (index, name) in names.into_iter().enumerate() {
                let resolver = resolver.clone();
                lookups.spawn(async move { (index, resolver.ipv4_lookup(fqdn(&name)).await) });
            }
            let mut answers: Vec<Option<Result<_, NetError>>> = (0..count).map(|_| None).collect();
            let deadline = tokio::time::Instant::now() + within;
            while let Ok(Some(joined)) =
                tokio::time::timeout_at(deadline, lookups.join_next()).await
            {
                if let Ok((index, answer)) = joined {
                    answers[index] = Some(answer);
                }
            }
            lookups.abort_all();
            answers
        });
        let answers = match self.runtime.block_on(task) {
            Ok(answers) => answers,
            Err(join) => {
                log::warn!("dns: the lookups did not finish: {join}");
                (0..count).map(|_| None).collect()
            }
        };
        let now = Instant::now();
        answers
            .into_iter()
            .map(|answer| match answer {
                None => Err(DnsFailure::Temporary("no answer in time".into())),
                Some(Ok(lookup)) => {
                    let addresses = lookup
                        .answers()
                        .iter()
                        .filter_map(|record| match &record.data {
                            RData::A(a) => Some(a.0),
                            _ => None,
                        })
                        .collect();
                    Ok((
                        addresses,
                        lookup.valid_until().saturating_duration_since(now),
                    ))
                }
                Some(Err(error)) => match classify(&error) {
                    LookupError::NxDomain | LookupError::NoRecords => {
                        Ok((Vec::new(), VERDICT_CACHE_TIME))
                    }
                    LookupError::Temporary(why) => Err(DnsFailure::Temporary(why)),
                },
            })
            .collect()
    }

    fn confirmed_name(&self, ip: IpAddr) -> Option<String> {
        let candidates = self.reverse_names(ip).ok()?;
        // The name goes into Received: headers and logs: a plain host
        // name or nothing (a label may hold any octet, line breaks too).
        candidates
            .into_iter()
            .filter(|name| is_host_name(name))
            .find(|name| {
                self.addresses(name, AddressFamily::Any)
                    .is_ok_and(|addresses| addresses.contains(&ip))
            })
    }
}

/// Letters, digits, hyphens, underscores and dots, at most 253 of them.
fn is_host_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// Answers kept for [`VERDICT_CACHE_TIME`], at most `max` of them
/// (expired ones are dropped when it is full; past that, new answers are
/// not kept).
struct BriefCache<K, V> {
    entries: Mutex<HashMap<K, (V, Instant)>>,
    max: usize,
}

impl<K: std::hash::Hash + Eq, V: Clone> BriefCache<K, V> {
    fn new(max: usize) -> Self {
        BriefCache {
            entries: Mutex::new(HashMap::new()),
            max,
        }
    }

    fn get(&self, key: &K) -> Option<V> {
        let entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        entries
            .get(key)
            .filter(|(_, at)| at.elapsed() < VERDICT_CACHE_TIME)
            .map(|(value, _)| value.clone())
    }

    fn put(&self, key: K, value: V) {
        let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        if entries.len() >= self.max {
            entries.retain(|_, (_, at)| at.elapsed() < VERDICT_CACHE_TIME);
        }
        if entries.len() < self.max {
            entries.insert(key, (value, Instant::now()));
        }
    }
}

fn worth_caching(texts: &[String]) -> bool {
    texts.iter().map(String::len).sum::<usize>() <= MAX_CACHED_TXT
}

/// A trailing dot makes the name absolute: no search domains are tried.
fn fqdn(name: &str) -> String {
    if name.ends_with('.') {
        name.to_string()
    } else {
        format!("{name}.")
    }
}

/// Sorts by preference and shuffles hosts of equal preference (RFC 5321
/// 5.1: spread the load), with `random` as the source of randomness.
pub fn order_by_preference(hosts: &mut [MailHost], mut random: impl FnMut() -> u64) {
    hosts.sort_by_key(|host| host.preference);
    let mut start = 0;
    while start < hosts.len() {
        let preference = hosts[start].preference;
        let end = hosts[start..]
            .iter()
            .position(|h| h.preference != preference)
            .map_or(hosts.len(), |offset| start + offset);
        // Fisher-Yates within the group.
        for i in (start + 1..end).rev() {
            let j = start + (random() % (i - start + 1) as u64) as usize;
            hosts.swap(i, j);
        }
        start = end;
    }
}

pub fn random_u64() -> u64 {
    let mut bytes = [0u8; 8];
    let random = ring::rand::SystemRandom::new();
    if ring::rand::SecureRandom::fill(&random, &mut bytes).is_err() {
        // Ordering and jitter only; the clock is random enough.
        return std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos() as u64)
            .unwrap_or(0);
    }
    u64::from_le_bytes(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_host_names_stand_for_a_client() {
        assert!(is_host_name("mail-1.example_host.org"));
        for odd in [
            "",
            "evil.example\r\nX-Injected: yes",
            "a b.example",
            "(comment).example",
            "\\010.example",
        ] {
            assert!(!is_host_name(odd), "{odd:?}");
        }
        assert!(!is_host_name(&"a".repeat(254)));
    }

    fn host(name: &str, preference: u16) -> MailHost {
        MailHost {
            name: name.into(),
            preference,
        }
    }

    #[test]
    fn preference_order_with_shuffled_ties() {
        let mut seen_first = std::collections::HashSet::new();
        let mut counter = 0u64;
        for _ in 0..50 {
            let mut hosts = vec![host("c", 20), host("a1", 10), host("b", 30), host("a2", 10)];
            order_by_preference(&mut hosts, || {
                counter = counter
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                counter >> 33
            });
            let names: Vec<&str> = hosts.iter().map(|h| h.name.as_str()).collect();
            assert_eq!(&names[2..], &["c", "b"]);
            assert!(names[..2].contains(&"a1") && names[..2].contains(&"a2"));
            seen_first.insert(names[0].to_string());
        }
        assert_eq!(seen_first.len(), 2, "equal preferences are shuffled");
    }

    #[test]
    fn caches_are_bounded_in_entries_and_txt_answers_in_size() {
        let cache: BriefCache<u32, String> = BriefCache::new(3);
        for key in 0..5 {
            cache.put(key, key.to_string());
        }
        assert_eq!(cache.get(&2).as_deref(), Some("2"));
        assert_eq!(cache.get(&3), None, "full: not kept");
        assert!(worth_caching(&[
            "v=DKIM1; p=".to_string() + &"A".repeat(800)
        ]));
        assert!(!worth_caching(&vec!["x".repeat(1024); 5]));
    }

    #[test]
    fn fqdn_adds_one_dot() {
        assert_eq!(fqdn("example.org"), "example.org.");
        assert_eq!(fqdn("example.org."), "example.org.");
    }
}
