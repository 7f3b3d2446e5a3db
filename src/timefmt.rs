//! Time stamps in the forms petrel writes: the queue's readable
//! `YYYY-MM-DD HH:MM:SS` (UTC, which SQLite's date functions understand and
//! which sorts as text), short durations for logs, and (from
//! [`crate::protocol::date`]) RFC 5322 dates for headers.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use time::OffsetDateTime;
use time::macros::format_description;

const SQL_FORMAT: &[time::format_description::BorrowedFormatItem<'static>] =
    format_description!("[year]-[month]-[day] [hour]:[minute]:[second]");

fn to_offset(at: SystemTime) -> OffsetDateTime {
    OffsetDateTime::from(at)
}

/// `2026-11-28 17:48:58`, UTC.
pub fn sql_timestamp(at: SystemTime) -> String {
    to_offset(at)
        .format(SQL_FORMAT)
        .unwrap_or_else(|_| "1970-01-01 00:00:00".to_string())
}

pub fn parse_sql_timestamp(text: &str) -> Option<SystemTime> {
    let parsed = time::PrimitiveDateTime::parse(text, SQL_FORMAT).ok()?;
    let seconds = parsed.assume_utc().unix_timestamp();
    u64::try_from(seconds)
        .ok()
        .map(|s| UNIX_EPOCH + Duration::from_secs(s))
}

/// The header date lives with the rest of the message format.
pub use crate::protocol::date::rfc5322_date;

/// "3d4h", "5m10s", "0s": for log lines and the queue CLI.
pub fn short_duration(duration: Duration) -> String {
    let mut secs = duration.as_secs();
    if secs == 0 {
        return "0s".to_string();
    }
    let mut out = String::new();
    for (unit, size) in [("d", 86_400), ("h", 3600), ("m", 60), ("s", 1)] {
        if secs >= size {
            out.push_str(&format!("{}{unit}", secs / size));
            secs %= size;
            if out.len() >= 4 {
                break;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sql_timestamps_round_trip() {
        let at = UNIX_EPOCH + Duration::from_secs(1_795_887_338);
        let text = sql_timestamp(at);
        assert_eq!(text, "2026-11-28 17:35:38");
        assert_eq!(parse_sql_timestamp(&text), Some(at));
        assert_eq!(parse_sql_timestamp("yesterday"), None);
    }

    #[test]
    fn rfc5322() {
        let at = UNIX_EPOCH + Duration::from_secs(1_795_887_338);
        assert_eq!(rfc5322_date(at), "Sat, 28 Nov 2026 17:35:38 +0000");
    }

    #[test]
    fn short_durations() {
        assert_eq!(short_duration(Duration::from_secs(0)), "0s");
        assert_eq!(short_duration(Duration::from_secs(59)), "59s");
        assert_eq!(
            short_duration(Duration::from_secs(3 * 86_400 + 4 * 3600 + 5)),
            "3d4h"
        );
        assert_eq!(short_duration(Duration::from_secs(310)), "5m10s");
    }
}
