//! MTA-STS (RFC 8461) for outbound MX delivery: a domain that publishes
//! a policy says which MX hosts are its own and that they must be reached
//! over TLS with a certificate valid for their name. petrel discovers the
//! policy (`_mta-sts` TXT record), fetches it over HTTPS ([`fetch`]),
//! keeps it in the queue database until `max_age` runs out, and tells
//! delivery which hosts it may use and whether TLS must be verified.
//!
//! Owns the policy rules (record and policy syntax, MX patterns, when to
//! fetch again). Never connects to an MX host itself.

pub mod fetch;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use rusqlite::{Connection, OptionalExtension};
use rustls::ClientConfig;

use crate::dns::Dns;
use crate::host::assigned_here;
use crate::policy::outbound::OutboundPolicy;
use crate::store::{Commit, ReadPool, StoreError, StoreHandle};

/// RFC 8461 3.2: max_age is at most a year.
const MAX_AGE_LIMIT: u64 = 31_557_600;
/// A policy that could not be fetched is not asked for again this soon:
/// every delivery to a domain with a broken policy host would otherwise
/// wait for the fetch to time out.
const FAILED_FETCH_MEMORY: Duration = Duration::from_secs(300);
const FAILED_FETCH_ENTRIES: usize = 1000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Deliver only to listed MX hosts, over verified TLS.
    Enforce,
    /// Report what enforcement would refuse, deliver as usual.
    Testing,
    None,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Enforce => "enforce",
            Mode::Testing => "testing",
            Mode::None => "none",
        }
    }

    fn parse(text: &str) -> Option<Mode> {
        match text {
            "enforce" => Some(Mode::Enforce),
            "testing" => Some(Mode::Testing),
            "none" => Some(Mode::None),
            _ => None,
        }
    }
}

/// A domain's policy, as fetched and as cached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    pub domain: String,
    /// The TXT record's id= the policy came with.
    pub id: String,
    pub mode: Mode,
    /// mx: patterns, lower case.
    pub mx: Vec<String>,
    pub max_age: u64,
    pub expires_at: SystemTime,
}

impl Policy {
    /// RFC 8461 4.1: an MX host the policy names, exactly or by a
    /// `*.` pattern standing for one label.
    pub fn allows_host(&self, host: &str) -> bool {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        self.mx
            .iter()
            .any(|pattern| match pattern.strip_prefix("*.") {
                Some(parent) => host
                    .split_once('.')
                    .is_some_and(|(label, rest)| !label.is_empty() && rest == parent),
                None => *pattern == host,
            })
    }
}

/// The id= of a domain's `_mta-sts` TXT record (RFC 8461 3.1), or `None`
/// when there is not exactly one valid record.
pub fn record_id(texts: &[String]) -> Option<String> {
    let mut ids = texts.iter().filter_map(|text| {
        let mut fields = text.split(';').map(str::trim).filter(|f| !f.is_empty());
        if fields.next()? != "v=STSv1" {
            return None;
        }
        let id = fields.find_map(|f| f.strip_prefix("id="))?;
        let valid = (1..=32).contains(&id.len()) && id.chars().all(|c| c.is_ascii_alphanumeric());
        valid.then(|| id.to_string())
    });
    match (ids.next(), ids.next()) {
        (Some(id), None) => Some(id),
        _ => None,
    }
}

/// Parses a policy body (RFC 8461 3.2); `Err` says what is wrong.
pub fn parse_policy(domain: &str, id: &str, body: &str, now: SystemTime) -> Result<Policy, String> {
    let mut version = None;
    let mut mode = None;
    let mut max_age = None;
    let mut mx = Vec::new();
    for line in body.lines() {
        let line = line.trim_end_matches('\r');
        if line.trim().is_empty() {
            continue;
        }
        let Some((key, value)) = line.split_once(':') else {
            return Err(format!("line without a colon: {line:?}"));
        };
        let value = value.trim();
        match key.trim() {
            "version" => version = Some(value.to_string()),
            "mode" => mode = Some(Mode::parse(value).ok_or(format!("unknown mode {value:?}"))?),
            "max_age" => {
                let seconds: u64 = value
                    .parse()
                    .map_err(|_| format!("max_age {value:?} is not a number"))?;
                max_age = Some(seconds.min(MAX_AGE_LIMIT));
            }
            "mx" => mx.push(value.trim_end_matches('.').to_ascii_lowercase()),
            // Unknown keys are for later versions (RFC 8461 3.2).
            _ => {}
        }
    }
    if version.as_deref() != Some("STSv1") {
        return Err("version is not STSv1".into());
    }
    let mode = mode.ok_or("no mode")?;
    let max_age = max_age.ok_or("no max_age")?;
    if mx.is_empty() && mode != Mode::None {
        return Err("no mx patterns".into());
    }
    Ok(Policy {
        domain: domain.to_string(),
        id: id.to_string(),
        mode,
        mx,
        max_age,
        expires_at: now + Duration::from_secs(max_age),
    })
}

/// What delivery asks: the policy for a domain, found as RFC 8461 3.3
/// and 5.1 describe, cached in the queue database.
pub struct Policies {
    dns: Arc<Dns>,
    outbound: OutboundPolicy,
    reads: ReadPool,
    store: StoreHandle,
    /// Verifies the policy host's certificate (Mozilla roots and
    /// `delivery.ca_file`).
    tls: Arc<ClientConfig>,
    https_port: u16,
    /// Domain → (policy id, when its fetch failed).
    failed: Mutex<HashMap<String, (String, Instant)>>,
}

impl Policies {
    pub fn new(
        dns: Arc<Dns>,
        outbound: OutboundPolicy,
        store: StoreHandle,
        tls: Arc<ClientConfig>,
        https_port: u16,
    ) -> Policies {
        Policies {
            dns,
            outbound,
            // A cached policy is one indexed row.
            reads: store.read_pool(2),
            store,
            tls,
            https_port,
            failed: Mutex::new(HashMap::new()),
        }
    }

    fn failed_recently(&self, domain: &str, id: &str) -> bool {
        let failed = self.failed.lock().unwrap_or_else(PoisonError::into_inner);
        failed
            .get(domain)
            .is_some_and(|(failed_id, at)| failed_id == id && at.elapsed() < FAILED_FETCH_MEMORY)
    }

    fn remember_failure(&self, domain: &str, id: &str) {
        let mut failed = self.failed.lock().unwrap_or_else(PoisonError::into_inner);
        if failed.len() >= FAILED_FETCH_ENTRIES {
            failed.retain(|_, (_, at)| at.elapsed() < FAILED_FETCH_MEMORY);
        }
        if failed.len() < FAILED_FETCH_ENTRIES {
            failed.insert(domain.to_string(), (id.to_string(), Instant::now()));
        }
    }

    /// The policy in force for `domain`, if any. A domain whose policy
    /// cannot be fetched and that has none cached has none (RFC 8461 3.3:
    /// no policy is not an error); a cached one stays in force until it
    /// expires, whatever DNS and HTTPS say meanwhile.
    pub fn for_domain(&self, domain: &str) -> Option<Policy> {
        let domain = domain.trim_end_matches('.').to_ascii_lowercase();
        let now = SystemTime::now();
        let cached = match self.reads.run(|conn| load(conn, &domain)) {
            Ok(cached) => cached.filter(|policy| policy.expires_at > now),
            Err(error) => {
                log::warn!("MTA-STS: cannot read the cached policy of {domain}: {error}");
                None
            }
        };
        let id = match self.dns.txt(&format!("_mta-sts.{domain}")) {
            Ok(texts) => record_id(&texts),
            Err(failure) => {
                log::info!("MTA-STS: _mta-sts.{domain}: {failure}; using the cached policy if any");
                return cached;
            }
        };
        let Some(id) = id else {
            return cached;
        };
        if let Some(policy) = &cached
            && policy.id == id
        {
            return cached;
        }
        if self.failed_recently(&domain, &id) {
            return cached;
        }
        let fetched = fetch::policy_text(
            &self.dns,
            &self.outbound,
            &domain,
            self.https_port,
            Arc::clone(&self.tls),
        )
        .and_then(|body| parse_policy(&domain, &id, &body, now));
        match fetched {
            Ok(policy) => {
                log::info!(
                    "MTA-STS: {domain}: policy {id} fetched, mode {}, max_age {}",
                    policy.mode.name(),
                    policy.max_age
                );
                let cached = policy.clone();
                let stored = self
                    .store
                    .write(Commit::Durable, move |conn, now| store(conn, &cached, now));
                if let Err(error) = stored {
                    log::warn!("MTA-STS: cannot cache the policy of {domain}: {error}");
                }
                Some(policy)
            }
            Err(why) => {
                log::warn!("MTA-STS: {domain}: cannot fetch policy {id}: {why}");
                self.remember_failure(&domain, &id);
                cached
            }
        }
    }
}

/// The cached policy of `domain`, expired or not.
pub fn load(conn: &Connection, domain: &str) -> Result<Option<Policy>, StoreError> {
    let row = conn
        .query_row(
            "SELECT policy_id, mode, mx, max_age, expires_at FROM mta_sts_policies WHERE domain = ?1",
            [domain],
            |row| {
                Ok((
                    row.get::<_, String>(0)?,
                    row.get::<_, String>(1)?,
                    row.get::<_, String>(2)?,
                    row.get::<_, i64>(3)?,
                    row.get::<_, String>(4)?,
                ))
            },
        )
        .optional()
        .map_err(StoreError::sqlite("cannot read an MTA-STS policy"))?;
    let Some((id, mode, mx, max_age, expires_at)) = row else {
        return Ok(None);
    };
    // A row this petrel cannot read is no policy, as an unfetchable one.
    let (Some(mode), Some(expires_at)) = (
        Mode::parse(&mode),
        crate::timefmt::parse_sql_timestamp(&expires_at),
    ) else {
        return Ok(None);
    };
    Ok(Some(Policy {
        domain: domain.to_string(),
        id,
        mode,
        mx: mx.lines().map(str::to_string).collect(),
        max_age: u64::try_from(max_age).unwrap_or(0),
        expires_at,
    }))
}

/// Replaces the cached policy of its domain; `now` as the queue writes
/// timestamps.
pub fn store(conn: &Connection, policy: &Policy, now: &str) -> Result<(), StoreError> {
    conn.execute(
        "INSERT OR REPLACE INTO mta_sts_policies
             (domain, policy_id, mode, mx, max_age, fetched_at, expires_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        rusqlite::params![
            policy.domain,
            policy.id,
            policy.mode.name(),
            policy.mx.join("\n"),
            i64::try_from(policy.max_age).unwrap_or(i64::MAX),
            now,
            crate::timefmt::sql_timestamp(policy.expires_at),
        ],
    )
    .map(|_| ())
    .map_err(StoreError::sqlite("cannot store an MTA-STS policy"))
}

/// Addresses of a host that delivery may connect to: a policy host is
/// named by whoever controls the recipient domain's DNS, so it gets the
/// same limits as an MX host (no private or loopback ranges unless
/// allowed), or a stranger could make us fetch from inside the network.
fn allowed_addresses(
    dns: &Dns,
    outbound: &OutboundPolicy,
    host: &str,
    port: u16,
) -> Result<Vec<SocketAddr>, String> {
    let addresses = dns
        .addresses(host, crate::config::AddressFamily::Any)
        .map_err(|failure| format!("{host}: {failure}"))?;
    let allowed: Vec<SocketAddr> = addresses
        .into_iter()
        .map(|ip| SocketAddr::new(ip, port))
        .filter(|peer| outbound.check(*peer, assigned_here).is_ok())
        .collect();
    if allowed.is_empty() {
        return Err(format!(
            "{host} has no address delivery may connect to (delivery.allowed_networks)"
        ));
    }
    Ok(allowed)
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: SystemTime = SystemTime::UNIX_EPOCH;

    #[test]
    fn policies_parse_as_the_rfc_example() {
        let body = "version: STSv1\r\nmode: enforce\r\nmx: mail.example.com\r\n\
                    mx: *.example.net\r\nmx: backupmx.example.com\r\nmax_age: 604800\r\n";
        let policy = parse_policy("example.com", "20160831085700Z", body, NOW).unwrap();
        assert_eq!(policy.mode, Mode::Enforce);
        assert_eq!(policy.max_age, 604_800);
        assert!(policy.allows_host("mail.example.com"));
        assert!(policy.allows_host("MAIL.example.com."));
        assert!(policy.allows_host("mx1.example.net"));
        assert!(!policy.allows_host("a.b.example.net"), "one label only");
        assert!(!policy.allows_host("example.net"));
        assert!(!policy.allows_host("evil.example.org"));
        let lf = body.replace("\r\n", "\n");
        assert_eq!(
            parse_policy("example.com", "1", &lf, NOW).unwrap().mx.len(),
            3
        );
    }

    #[test]
    fn bad_policies_are_refused() {
        for body in [
            "version: STSv2\nmode: enforce\nmx: a.example\nmax_age: 1\n",
            "version: STSv1\nmode: strict\nmx: a.example\nmax_age: 1\n",
            "version: STSv1\nmode: enforce\nmax_age: 1\n",
            "version: STSv1\nmode: enforce\nmx: a.example\n",
            "version: STSv1\nmode: enforce\nmx: a.example\nmax_age: soon\n",
            "<html>not a policy</html>",
        ] {
            assert!(parse_policy("x", "1", body, NOW).is_err(), "{body}");
        }
        let huge = "version: STSv1\nmode: testing\nmx: a.example\nmax_age: 999999999999\n";
        assert_eq!(
            parse_policy("x", "1", huge, NOW).unwrap().max_age,
            MAX_AGE_LIMIT
        );
    }

    #[test]
    fn txt_records() {
        let one = |text: &str| record_id(&[text.to_string()]);
        assert_eq!(
            one("v=STSv1; id=20160831085700Z;"),
            Some("20160831085700Z".into())
        );
        assert_eq!(one("v=STSv1;id=abc"), Some("abc".into()));
        assert_eq!(one("v=STSv2; id=abc"), None);
        assert_eq!(one("v=STSv1; id=a-b"), None);
        assert_eq!(one("v=STSv1"), None);
        assert_eq!(
            record_id(&["v=STSv1; id=a".to_string(), "v=STSv1; id=b".to_string()]),
            None,
            "two records are none"
        );
    }

    #[test]
    fn the_cache_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let conn = crate::store::open_direct(dir.path()).unwrap();
        let now = SystemTime::now();
        let body = "version: STSv1\nmode: testing\nmx: *.example.net\nmax_age: 86400\n";
        let policy = parse_policy("example.net", "7", body, now).unwrap();
        store(&conn, &policy, &crate::timefmt::sql_timestamp(now)).unwrap();
        let loaded = load(&conn, "example.net").unwrap().unwrap();
        assert_eq!((loaded.id.as_str(), loaded.mode), ("7", Mode::Testing));
        assert_eq!(loaded.mx, vec!["*.example.net"]);
        let drift = loaded
            .expires_at
            .duration_since(now)
            .unwrap_or_default()
            .as_secs();
        assert!((86_399..=86_400).contains(&drift), "{drift}");
        assert_eq!(load(&conn, "other.example").unwrap(), None);
    }
}
