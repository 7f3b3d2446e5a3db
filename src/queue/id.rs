//! Queue ids: 16 upper-case hex digits, time-ordered so `ORDER BY id` is the
//! order of arrival and an operator can tell old from new at a glance.

use std::fmt;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct QueueId(String);

/// Microseconds of the last id handed out by this process, so ids stay
/// unique and increasing even when many are made in the same microsecond.
static LAST_MICROS: AtomicU64 = AtomicU64::new(0);

impl QueueId {
    /// 13 hex digits of microseconds since 1970 (enough until 2112) and
    /// 3 hex digits that differ between processes, because `petrel sendmail`
    /// writes to the same queue as the server.
    pub fn generate() -> QueueId {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_micros() as u64)
            .unwrap_or(0);
        let previous = LAST_MICROS
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |last| {
                Some(now.max(last + 1))
            })
            .unwrap_or(now);
        let micros = now.max(previous + 1) & 0x000F_FFFF_FFFF_FFFF;
        QueueId(format!("{micros:013X}{:03X}", process_salt()))
    }

    /// The first 13 digits of the ids made at `at`: ids compare as text in
    /// time order, so this is a bound for "received before/after `at`".
    pub fn prefix_at(at: SystemTime) -> String {
        let micros = at
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_micros() as u64)
            .unwrap_or(0)
            & 0x000F_FFFF_FFFF_FFFF;
        format!("{micros:013X}")
    }

    /// Accepts what `generate` makes (and what an operator types, in any case).
    pub fn parse(text: &str) -> Option<QueueId> {
        let valid = text.len() == 16 && text.chars().all(|c| c.is_ascii_hexdigit());
        valid.then(|| QueueId(text.to_ascii_uppercase()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for QueueId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

fn process_salt() -> u64 {
    static SALT: OnceLock<u64> = OnceLock::new();
    *SALT.get_or_init(|| {
        let mut bytes = [0u8; 2];
        let random = ring::rand::SystemRandom::new();
        if ring::rand::SecureRandom::fill(&random, &mut bytes).is_err() {
            // Only uniqueness across processes depends on this; the pid is
            // a fine second choice.
            return u64::from(std::process::id()) & 0xFFF;
        }
        u64::from(u16::from_le_bytes(bytes)) & 0xFFF
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_unique_and_increasing() {
        let ids: Vec<QueueId> = (0..10_000).map(|_| QueueId::generate()).collect();
        for pair in ids.windows(2) {
            assert!(pair[0] < pair[1], "{} !< {}", pair[0], pair[1]);
        }
    }

    #[test]
    fn parse_round_trips() {
        let id = QueueId::generate();
        assert_eq!(QueueId::parse(id.as_str()), Some(id.clone()));
        assert_eq!(QueueId::parse(&id.as_str().to_lowercase()), Some(id));
        assert_eq!(QueueId::parse("XYZ"), None);
        assert_eq!(QueueId::parse("0123456789ABCDEG"), None);
    }
}
