//! Delivery status notifications (RFC 3464): bounces for recipients that
//! failed for good and the one "still trying" warning for delayed ones.
//! Sent from the null sender, so they are never bounced themselves, and
//! never sent to the null sender or about a notice (RFC 5321 6.1, 4.5.5).

use std::time::SystemTime;

use crate::protocol::data::header_section_len;
use crate::queue::delivery::StoredMessage;
use crate::queue::{MessageKind, NewMessage, NewRecipient, QueueId};
use crate::timefmt::rfc5322_date;

/// One recipient the notice is about.
#[derive(Debug, Clone)]
pub struct Problem {
    pub address: String,
    pub original: Option<String>,
    /// The reply or reason, e.g. "550 5.1.1 No such user".
    pub diagnostic: String,
    /// host[ip]:port when a remote server gave the answer.
    pub remote_mta: Option<String>,
}

impl Problem {
    /// RFC 3463 status: the reply's enhanced code, else one derived from
    /// the basic code.
    fn status(&self, failed: bool) -> String {
        let mut words = self.diagnostic.split_whitespace();
        let code = words.next().unwrap_or("");
        if let Some(enhanced) = words.next()
            && enhanced.split('.').count() == 3
            && enhanced
                .split('.')
                .all(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_digit()))
            && matches!(enhanced.as_bytes()[0], b'2' | b'4' | b'5')
        {
            return enhanced.to_string();
        }
        match (code.as_bytes().first(), failed) {
            (Some(b'5'), _) => "5.0.0".into(),
            (_, true) => "4.4.7".into(),
            _ => "4.0.0".into(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoticeKind {
    Failed,
    Delayed,
}

/// Whether a notice may be sent about `message` at all.
pub fn may_notify(message: &StoredMessage) -> bool {
    !message.sender.is_empty() && message.kind == MessageKind::Normal
}

/// Builds the notice, or `None` when none may be sent.
pub fn notice(
    hostname: &str,
    message: &StoredMessage,
    kind: NoticeKind,
    problems: &[Problem],
    now: SystemTime,
    retry_until: Option<SystemTime>,
) -> Option<NewMessage> {
    if problems.is_empty() || !may_notify(message) {
        return None;
    }
    let id = QueueId::generate();
    let boundary = format!("{id}.petrel/{hostname}");
    let date = rfc5322_date(now);
    let (subject, intro) = match kind {
        NoticeKind::Failed => (
            "Undelivered Mail Returned to Sender",
            "Your message could not be delivered to one or more recipients.\n\
             It has been given up on; the details follow.",
        ),
        NoticeKind::Delayed => (
            "Delayed Mail (still being retried)",
            "Your message has not been delivered yet to one or more recipients.\n\
             It is still being retried; you do not need to send it again.",
        ),
    };
    let mut human = format!("This is the mail system at host {hostname}.\n\n{intro}\n\n");
    for problem in problems {
        human.push_str(&format!("<{}>: {}\n", problem.address, problem.diagnostic));
    }
    if let (NoticeKind::Delayed, Some(until)) = (kind, retry_until) {
        human.push_str(&format!(
            "\nDelivery will be tried until {}.\n",
            rfc5322_date(until)
        ));
    }

    let mut status = format!(
        "Reporting-MTA: dns; {hostname}\nX-Petrel-Queue-ID: {}\nArrival-Date: {}\n",
        message.id,
        rfc5322_date(message.received_at)
    );
    for problem in problems {
        status.push('\n');
        if let Some(original) = &problem.original {
            status.push_str(&format!("Original-Recipient: rfc822; {original}\n"));
        }
        status.push_str(&format!("Final-Recipient: rfc822; {}\n", problem.address));
        let (action, failed) = match kind {
            NoticeKind::Failed => ("failed", true),
            NoticeKind::Delayed => ("delayed", false),
        };
        status.push_str(&format!(
            "Action: {action}\nStatus: {}\n",
            problem.status(failed)
        ));
        if let Some(remote) = &problem.remote_mta {
            let host = remote.split('[').next().unwrap_or(remote);
            status.push_str(&format!("Remote-MTA: dns; {host}\n"));
        }
        status.push_str(&format!(
            "Diagnostic-Code: smtp; {}\nLast-Attempt-Date: {date}\n",
            one_line(&problem.diagnostic)
        ));
        if let (NoticeKind::Delayed, Some(until)) = (kind, retry_until) {
            status.push_str(&format!("Will-Retry-Until: {}\n", rfc5322_date(until)));
        }
    }

    let body = format!(
        "From: Mail Delivery System <MAILER-DAEMON@{hostname}>\n\
         To: <{sender}>\n\
         Subject: {subject}\n\
         Date: {date}\n\
         Message-ID: <{id}@{hostname}>\n\
         Auto-Submitted: auto-replied\n\
         MIME-Version: 1.0\n\
         Content-Type: multipart/report; report-type=delivery-status;\n\
         \tboundary=\"{boundary}\"\n\
         \n\
         This is a MIME-encapsulated message.\n\
         \n\
         --{boundary}\n\
         Content-Type: text/plain; charset=utf-8\n\
         Content-Description: Notification\n\
         \n\
         {human}\n\
         --{boundary}\n\
         Content-Type: message/delivery-status\n\
         Content-Description: Delivery report\n\
         \n\
         {status}\n\
         --{boundary}\n\
         Content-Type: text/rfc822-headers\n\
         Content-Description: Headers of the original message\n\
         \n\
         {headers}\n\
         --{boundary}--\n",
        sender = message.sender,
        headers = String::from_utf8_lossy(original_headers(&message.content))
            .replace("\r\n", "\n")
            .replace('\r', ""),
    );
    let content = body.replace('\n', "\r\n").into_bytes();
    let eight_bit = !content.is_ascii();
    Some(NewMessage {
        id,
        sender: String::new(),
        recipients: vec![NewRecipient {
            address: message.sender.clone(),
            original: None,
        }],
        content,
        client_ip: None,
        helo: None,
        auth_user: None,
        listener: "local".into(),
        eight_bit,
        smtputf8: message.smtputf8,
        kind: match kind {
            NoticeKind::Failed => MessageKind::Bounce,
            NoticeKind::Delayed => MessageKind::DelayWarning,
        },
    })
}

fn one_line(text: &str) -> String {
    // Remote replies end up in a header-like field; keep them on one line.
    text.replace(['\r', '\n'], " ")
}

/// The header section of a message (up to the first empty line), without
/// the trailing line break; CRLF turned into LF for embedding.
fn original_headers(content: &[u8]) -> &[u8] {
    let headers = &content[..header_section_len(content)];
    headers.strip_suffix(b"\r\n").unwrap_or(headers)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn message(sender: &str, kind: MessageKind) -> StoredMessage {
        StoredMessage {
            id: "0123456789ABCDEF".into(),
            sender: sender.into(),
            kind,
            received_at: SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_887_338),
            eight_bit: false,
            smtputf8: false,
            delay_warning_sent: false,
            content:
                b"Received: from x\r\nSubject: Hello\r\nFrom: a@example.org\r\n\r\nsecret body\r\n"
                    .to_vec(),
        }
    }

    fn problem() -> Problem {
        Problem {
            address: "bob@example.net".into(),
            original: Some("team@example.org".into()),
            diagnostic: "550 5.1.1 <bob@example.net>: no such user (in reply to RCPT TO)".into(),
            remote_mta: Some("mx.example.net[192.0.2.1]:25".into()),
        }
    }

    #[test]
    fn bounce_is_a_multipart_report() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_890_000);
        let notice = notice(
            "mx.test",
            &message("a@example.org", MessageKind::Normal),
            NoticeKind::Failed,
            &[problem()],
            now,
            None,
        )
        .unwrap();
        assert_eq!(notice.sender, "");
        assert_eq!(notice.kind, MessageKind::Bounce);
        assert_eq!(notice.recipients[0].address, "a@example.org");
        let text = String::from_utf8(notice.content).unwrap();
        assert!(
            !text.replace("\r\n", "").contains('\n'),
            "CRLF line ends only"
        );
        for expected in [
            "Content-Type: multipart/report; report-type=delivery-status;",
            "Auto-Submitted: auto-replied",
            "Reporting-MTA: dns; mx.test",
            "Original-Recipient: rfc822; team@example.org",
            "Final-Recipient: rfc822; bob@example.net",
            "Action: failed",
            "Status: 5.1.1",
            "Remote-MTA: dns; mx.example.net",
            "Diagnostic-Code: smtp; 550 5.1.1",
            "Content-Type: text/rfc822-headers",
            "Subject: Hello",
        ] {
            assert!(text.contains(expected), "missing {expected:?} in\n{text}");
        }
        assert!(
            !text.contains("secret body"),
            "only the headers are returned"
        );
    }

    #[test]
    fn delay_warning() {
        let now = SystemTime::now();
        let notice = notice(
            "mx.test",
            &message("a@example.org", MessageKind::Normal),
            NoticeKind::Delayed,
            &[Problem {
                diagnostic: "451 4.4.1 connection refused".into(),
                remote_mta: None,
                ..problem()
            }],
            now,
            Some(now),
        )
        .unwrap();
        assert_eq!(notice.kind, MessageKind::DelayWarning);
        let text = String::from_utf8(notice.content).unwrap();
        assert!(text.contains("Action: delayed"));
        assert!(text.contains("Status: 4.4.1"));
        assert!(text.contains("Will-Retry-Until: "));
    }

    #[test]
    fn never_to_the_null_sender_nor_about_a_notice() {
        let now = SystemTime::now();
        assert!(
            notice(
                "mx.test",
                &message("", MessageKind::Normal),
                NoticeKind::Failed,
                &[problem()],
                now,
                None
            )
            .is_none()
        );
        assert!(
            notice(
                "mx.test",
                &message("a@example.org", MessageKind::Bounce),
                NoticeKind::Failed,
                &[problem()],
                now,
                None
            )
            .is_none()
        );
        assert!(
            notice(
                "mx.test",
                &message("a@example.org", MessageKind::DelayWarning),
                NoticeKind::Failed,
                &[problem()],
                now,
                None
            )
            .is_none()
        );
    }

    #[test]
    fn status_codes_without_enhanced_code() {
        let mut p = problem();
        p.diagnostic = "550 no such user".into();
        assert_eq!(p.status(true), "5.0.0");
        p.diagnostic = "421 busy".into();
        assert_eq!(p.status(true), "4.4.7");
        assert_eq!(p.status(false), "4.0.0");
    }
}
