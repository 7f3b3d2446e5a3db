//! Dates as messages carry them (RFC 5322 3.3), for `Date:`, `Received:`
//! and reports.

use std::time::SystemTime;

use time::OffsetDateTime;
use time::format_description::well_known::Rfc2822;

/// `Sat, 28 Nov 2026 17:48:58 +0000`.
pub fn rfc5322_date(at: SystemTime) -> String {
    OffsetDateTime::from(at)
        .format(&Rfc2822)
        .unwrap_or_else(|_| "Thu, 01 Jan 1970 00:00:00 +0000".to_string())
}
