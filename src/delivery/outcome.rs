//! What one delivery attempt did for one recipient, as data: the verdict,
//! the reply code, the RFC 3463 status, the text, and the stage of the
//! transaction it came from. Logs, the queue's `last_reply` and delivery
//! status notifications are all written from these fields; nothing parses
//! a reply string back.
//!
//! The replies petrel gives itself (local delivery, DNS verdicts, policy)
//! are named constants here, as the session's are in `protocol::reply`.

use std::fmt;

use crate::protocol::client::ServerReply;
use crate::protocol::reply::{Status, enhanced};

pub const DELIVERED_TO_MAILDIR: Status = enhanced(250, "2.0.0");
/// The mailbox was removed after the message was accepted.
pub const MAILBOX_GONE: Status = enhanced(550, "5.1.1");
pub const MAILBOX_UNAVAILABLE: Status = enhanced(451, "4.3.0");
pub const NO_SUCH_DOMAIN: Status = enhanced(550, "5.1.2");
pub const NULL_MX: Status = enhanced(556, "5.1.10");
pub const DNS_TEMPORARY: Status = enhanced(451, "4.4.3");
/// No host could be reached, or none answered usefully.
pub const NO_ANSWER: Status = enhanced(451, "4.4.1");
/// Every mail host is at an address delivery may not connect to.
pub const DESTINATION_NOT_ALLOWED: Status = enhanced(550, "5.4.4");
/// The domain's mail hosts are petrel itself.
pub const LOOPS_BACK: Status = enhanced(554, "5.4.6");
pub const TOO_BIG_FOR_PEER: Status = enhanced(552, "5.3.4");
pub const PEER_LACKS_SMTPUTF8: Status = enhanced(553, "5.6.7");
pub const PEER_LACKS_8BITMIME: Status = enhanced(554, "5.6.3");
pub const SMARTHOST_MISCONFIGURED: Status = enhanced(451, "4.3.5");
pub const SMARTHOST_TLS_UNAVAILABLE: Status = enhanced(451, "4.7.5");
/// The domain's MTA-STS policy lists none of its MX hosts (RFC 8461 4.2:
/// not delivered, and not bounced either: the policy or DNS may be fixed).
pub const MTA_STS_NO_LISTED_MX: Status = enhanced(451, "4.7.5");
/// `petrel queue bounce`, when a recipient has no earlier error to report.
pub const CANCELLED_BY_OPERATOR: Status = enhanced(550, "5.0.0");

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Delivered,
    /// 4xx, connection trouble, temporary DNS failure: retry later.
    Temporary,
    /// 5xx or a permanent DNS verdict: bounce.
    Permanent,
}

/// Where in the attempt the answer came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Finding the hosts: DNS, address policy, configuration.
    Routing,
    Connect,
    Greeting,
    Hello,
    StartTls,
    Auth,
    MailFrom,
    RcptTo,
    Data,
    EndOfData,
    /// Writing into a local Maildir.
    Mailbox,
}

impl Stage {
    /// Postfix's words for the command a reply answered.
    fn command(self) -> Option<&'static str> {
        match self {
            Stage::Greeting => Some("initial greeting"),
            Stage::Hello => Some("EHLO"),
            Stage::StartTls => Some("STARTTLS"),
            Stage::Auth => Some("AUTH"),
            Stage::MailFrom => Some("MAIL FROM"),
            Stage::RcptTo => Some("RCPT TO"),
            Stage::Data => Some("DATA"),
            Stage::EndOfData => Some("end of DATA"),
            Stage::Routing | Stage::Connect | Stage::Mailbox => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attempt {
    pub verdict: Verdict,
    pub code: u16,
    /// RFC 3463 status, e.g. "5.1.1".
    pub status: String,
    pub text: String,
    pub stage: Stage,
    /// A remote server gave this reply (rather than petrel itself).
    pub remote: bool,
}

fn verdict_of(code: u16) -> Verdict {
    match code {
        200..=399 => Verdict::Delivered,
        400..=499 => Verdict::Temporary,
        _ => Verdict::Permanent,
    }
}

impl Attempt {
    /// An outcome petrel decided itself.
    pub fn local(status: Status, stage: Stage, text: impl Into<String>) -> Attempt {
        let class = status.code / 100;
        Attempt {
            verdict: verdict_of(status.code),
            code: status.code,
            status: status
                .enhanced
                .map_or_else(|| format!("{class}.0.0"), str::to_string),
            text: text.into(),
            stage,
            remote: false,
        }
    }

    /// A remote server's reply. Without an enhanced code in it, the status
    /// is the generic one of its class (RFC 3463 x.0.0).
    pub fn from_reply(reply: &ServerReply, stage: Stage) -> Attempt {
        let enhanced = reply.enhanced().map(str::to_string);
        let mut words: Vec<&str> = Vec::new();
        for (index, line) in reply.lines.iter().enumerate() {
            let line = match (&enhanced, index) {
                (Some(code), 0) => line
                    .strip_prefix(code.as_str())
                    .unwrap_or(line)
                    .trim_start(),
                _ => line.as_str(),
            };
            if !line.is_empty() {
                words.push(line);
            }
        }
        let class = reply.code / 100;
        Attempt {
            verdict: verdict_of(reply.code),
            code: reply.code,
            status: enhanced.unwrap_or_else(|| format!("{class}.0.0")),
            text: words.join(" "),
            stage,
            remote: true,
        }
    }

    /// Keeps the mail: a refusal that the operator, not the sender, has to
    /// fix (a smart host refusing our credentials) is retried, not bounced.
    pub fn retried(mut self) -> Attempt {
        if self.verdict == Verdict::Permanent {
            self.verdict = Verdict::Temporary;
        }
        self
    }

    pub fn with_text(mut self, text: impl Into<String>) -> Attempt {
        self.text = text.into();
        self
    }
}

impl fmt::Display for Attempt {
    /// "550 5.1.1 No such user (in reply to RCPT TO)", as Postfix logs it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.code, self.status)?;
        if !self.text.is_empty() {
            write!(f, " {}", self.text)?;
        }
        if self.remote
            && let Some(command) = self.stage.command()
        {
            write!(f, " (in reply to {command})")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(code: u16, lines: &[&str]) -> ServerReply {
        ServerReply {
            code,
            lines: lines.iter().map(|l| l.to_string()).collect(),
        }
    }

    #[test]
    fn remote_replies_keep_their_parts() {
        let attempt = Attempt::from_reply(
            &reply(
                550,
                &["5.1.1 <bob@example.net>: no such user", "see the FAQ"],
            ),
            Stage::RcptTo,
        );
        assert_eq!(attempt.verdict, Verdict::Permanent);
        assert_eq!(attempt.status, "5.1.1");
        assert_eq!(attempt.text, "<bob@example.net>: no such user see the FAQ");
        assert_eq!(
            attempt.to_string(),
            "550 5.1.1 <bob@example.net>: no such user see the FAQ (in reply to RCPT TO)"
        );
        let plain = Attempt::from_reply(&reply(451, &["try later"]), Stage::EndOfData);
        assert_eq!(
            (plain.verdict, plain.status.as_str()),
            (Verdict::Temporary, "4.0.0")
        );
        let ok = Attempt::from_reply(&reply(250, &["2.0.0 Ok: queued as X"]), Stage::EndOfData);
        assert_eq!(ok.verdict, Verdict::Delivered);
    }

    #[test]
    fn local_outcomes_use_named_statuses() {
        let attempt = Attempt::local(MAILBOX_GONE, Stage::Mailbox, "<a@b>: no such mailbox");
        assert_eq!(attempt.to_string(), "550 5.1.1 <a@b>: no such mailbox");
        assert_eq!(attempt.verdict, Verdict::Permanent);
        assert_eq!(attempt.clone().retried().verdict, Verdict::Temporary);
        assert_eq!(
            Attempt::local(NO_ANSWER, Stage::Connect, "x").verdict,
            Verdict::Temporary
        );
    }
}
