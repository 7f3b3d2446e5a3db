//! Delivery status notifications (RFC 3464, RFC 6533 for SMTPUTF8 mail):
//! bounces for recipients that failed for good, the one "still trying"
//! warning for delayed ones, and success reports where the sender asked
//! for them (RFC 3461). Sent from the null sender, so they are never
//! bounced themselves, and never sent to the null sender or about a
//! notice (RFC 5321 6.1, 4.5.5).
//!
//! A notice goes to the envelope sender, which anyone can forge; so it
//! must not be a way to mail arbitrary content to anyone. It carries the
//! original header section only, capped at [`MAX_RETURNED_HEADERS`] and cut
//! at a field boundary; the whole message only when the sender asked for it
//! (RET=FULL) and it fits in [`MAX_RETURNED_MESSAGE`]. MIME boundaries are
//! random, so no client can predict one and forge parts.

use std::time::SystemTime;

use crate::envelope::Recipient;
use crate::protocol::data::header_section_len;
use crate::protocol::dsn::Notify;
use crate::protocol::dsn::Ret;
use crate::queue::content::Content;
use crate::queue::delivery::StoredMessage;
use crate::queue::{MessageKind, NewMessage, NewRecipient, QueueId};
use crate::timefmt::rfc5322_date;

/// Most of the original header section a notice returns.
pub const MAX_RETURNED_HEADERS: usize = 64 * 1024;
/// Largest original message returned whole (RET=FULL); bigger ones are
/// returned as headers only. Postfix's bounce_size_limit is 50 kB; this
/// leaves room for a small attachment.
pub const MAX_RETURNED_MESSAGE: usize = 256 * 1024;

/// One recipient the notice is about.
#[derive(Debug, Clone)]
pub struct Problem {
    pub address: String,
    /// The Original-Recipient field (see [`original_recipient`]).
    pub original: Option<String>,
    /// The reply or reason, as logged: "550 5.1.1 No such user (in reply to RCPT TO)".
    pub diagnostic: String,
    /// Its RFC 3463 status, e.g. "5.1.1".
    pub status: String,
    /// host[ip]:port when a remote server gave the answer.
    pub remote_mta: Option<String>,
    /// For success reports: handed to a server that does not report
    /// further (RFC 3464 "relayed") rather than delivered here.
    pub relayed: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoticeKind {
    Failed,
    Delayed,
    /// Delivered or relayed, for recipients that asked (NOTIFY=SUCCESS).
    Success,
}

impl NoticeKind {
    /// Whether a recipient's NOTIFY asks for this kind of notice.
    pub fn wanted_by(self, notify: Notify) -> bool {
        match self {
            NoticeKind::Failed => notify.failure,
            NoticeKind::Delayed => notify.delay,
            NoticeKind::Success => notify.success,
        }
    }
}

/// Whether a notice may be sent about `message` at all.
pub fn may_notify(message: &StoredMessage) -> bool {
    !message.sender.is_empty() && message.kind == MessageKind::Normal
}

/// Builds the notice, to `to` (the sender, routed), or `None` when none
/// may be sent.
pub fn notice(
    hostname: &str,
    message: &StoredMessage,
    kind: NoticeKind,
    problems: &[Problem],
    to: Vec<Recipient>,
    now: SystemTime,
    retry_until: Option<SystemTime>,
) -> Option<NewMessage> {
    if problems.is_empty() || to.is_empty() || !may_notify(message) {
        return None;
    }
    let report = StatusReport::of(hostname, message, kind, problems, now, retry_until);
    let mut human = human_part(hostname, kind, problems, retry_until);
    let global = message.smtputf8;
    let (returned_type, returned, note) = returned_content(message, kind, global);
    if let Some(note) = note {
        human.push_str(&format!("\n{note}\n"));
    }
    let id = QueueId::generate();
    let body = assemble(
        &Envelope {
            hostname,
            sender: &message.sender,
            subject: kind.subject(),
            date: now,
            id: &id,
            global,
        },
        &human,
        &report.render(),
        returned_type,
        &returned,
    );
    Some(NewMessage {
        id,
        sender: String::new(),
        recipients: to
            .into_iter()
            .map(|routed| NewRecipient {
                address: routed.address,
                original: None,
                route: routed.route,
                domain: routed.domain,
                notify: None,
                orcpt: None,
            })
            .collect(),
        eight_bit: !body.is_ascii(),
        content: Content::in_memory(body),
        client_ip: None,
        helo: None,
        auth_user: None,
        auth_label: None,
        listener: "local".into(),
        smtputf8: global,
        kind: match kind {
            NoticeKind::Failed | NoticeKind::Success => MessageKind::Bounce,
            NoticeKind::Delayed => MessageKind::DelayWarning,
        },
        ret: None,
        envid: None,
        quarantine: None,
    })
}

impl NoticeKind {
    fn subject(self) -> &'static str {
        match self {
            NoticeKind::Failed => "Undelivered Mail Returned to Sender",
            NoticeKind::Delayed => "Delayed Mail (still being retried)",
            NoticeKind::Success => "Successful Mail Delivery Report",
        }
    }

    fn intro(self) -> &'static str {
        match self {
            NoticeKind::Failed => {
                "Your message could not be delivered to one or more recipients.\n\
                 It has been given up on; the details follow."
            }
            NoticeKind::Delayed => {
                "Your message has not been delivered yet to one or more recipients.\n\
                 It is still being retried; you do not need to send it again."
            }
            NoticeKind::Success => {
                "Your message was delivered to the recipients below, or handed on to a mail\n\
                 system that does not report further, as you asked to be told."
            }
        }
    }
}

/// The first part: what happened, for a person.
fn human_part(
    hostname: &str,
    kind: NoticeKind,
    problems: &[Problem],
    retry_until: Option<SystemTime>,
) -> String {
    let mut human = format!(
        "This is the mail system at host {hostname}.\n\n{}\n\n",
        kind.intro()
    );
    for problem in problems {
        human.push_str(&format!(
            "<{}>: {}\n",
            one_line(&problem.address),
            one_line(&problem.diagnostic)
        ));
    }
    if let (NoticeKind::Delayed, Some(until)) = (kind, retry_until) {
        human.push_str(&format!(
            "\nDelivery will be tried until {}.\n",
            rfc5322_date(until)
        ));
    }
    human
}

/// RFC 3464 section 2.3.3: what became of a recipient.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Failed,
    Delayed,
    Delivered,
    /// Handed to a server that does not report further.
    Relayed,
}

impl Action {
    fn as_str(self) -> &'static str {
        match self {
            Action::Failed => "failed",
            Action::Delayed => "delayed",
            Action::Delivered => "delivered",
            Action::Relayed => "relayed",
        }
    }
}

/// The second part of a notice (RFC 3464 delivery-status) as data;
/// [`StatusReport::render`] writes it out. Every value that came from the
/// network is made one line when rendered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusReport {
    pub reporting_mta: String,
    pub envid: Option<String>,
    pub queue_id: String,
    pub arrival: SystemTime,
    pub recipients: Vec<RecipientReport>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecipientReport {
    pub original: Option<String>,
    pub address: String,
    pub action: Action,
    pub status: String,
    /// The host that answered, without its address.
    pub remote_mta: Option<String>,
    pub diagnostic: String,
    pub last_attempt: SystemTime,
    pub will_retry_until: Option<SystemTime>,
}

impl StatusReport {
    fn of(
        hostname: &str,
        message: &StoredMessage,
        kind: NoticeKind,
        problems: &[Problem],
        now: SystemTime,
        retry_until: Option<SystemTime>,
    ) -> StatusReport {
        let recipients = problems
            .iter()
            .map(|problem| RecipientReport {
                original: problem.original.clone(),
                address: problem.address.clone(),
                action: match kind {
                    NoticeKind::Failed => Action::Failed,
                    NoticeKind::Delayed => Action::Delayed,
                    NoticeKind::Success if problem.relayed => Action::Relayed,
                    NoticeKind::Success => Action::Delivered,
                },
                status: problem.status.clone(),
                remote_mta: problem
                    .remote_mta
                    .as_ref()
                    .map(|remote| remote.split('[').next().unwrap_or(remote).to_string()),
                diagnostic: problem.diagnostic.clone(),
                last_attempt: now,
                will_retry_until: retry_until.filter(|_| kind == NoticeKind::Delayed),
            })
            .collect();
        StatusReport {
            reporting_mta: hostname.to_string(),
            envid: message.envid.clone(),
            queue_id: message.id.clone(),
            arrival: message.received_at,
            recipients,
        }
    }

    pub fn render(&self) -> String {
        let mut status = format!("Reporting-MTA: dns; {}\n", self.reporting_mta);
        if let Some(envid) = &self.envid {
            status.push_str(&format!("Original-Envelope-Id: {}\n", one_line(envid)));
        }
        status.push_str(&format!(
            "X-Petrel-Queue-ID: {}\nArrival-Date: {}\n",
            self.queue_id,
            rfc5322_date(self.arrival)
        ));
        for recipient in &self.recipients {
            status.push('\n');
            recipient.render_into(&mut status);
        }
        status
    }
}

impl RecipientReport {
    fn render_into(&self, status: &mut String) {
        if let Some(original) = &self.original {
            status.push_str(&format!("Original-Recipient: {}\n", one_line(original)));
        }
        status.push_str(&format!(
            "Final-Recipient: {}\nAction: {}\nStatus: {}\n",
            one_line(&address_field(&self.address)),
            self.action.as_str(),
            one_line(&self.status)
        ));
        if let Some(remote) = &self.remote_mta {
            status.push_str(&format!("Remote-MTA: dns; {}\n", one_line(remote)));
        }
        status.push_str(&format!(
            "Diagnostic-Code: smtp; {}\nLast-Attempt-Date: {}\n",
            one_line(&self.diagnostic),
            rfc5322_date(self.last_attempt)
        ));
        if let Some(until) = self.will_retry_until {
            status.push_str(&format!("Will-Retry-Until: {}\n", rfc5322_date(until)));
        }
    }
}

/// The notice's own header fields.
struct Envelope<'a> {
    hostname: &'a str,
    /// The original message's sender: the notice's recipient.
    sender: &'a str,
    subject: &'a str,
    date: SystemTime,
    id: &'a QueueId,
    /// The original used SMTPUTF8: RFC 6533's global types.
    global: bool,
}

/// The whole notice: header, then the multipart/report with its three
/// parts, in CRLF lines.
fn assemble(
    envelope: &Envelope,
    human: &str,
    status: &str,
    returned_type: &str,
    returned: &[u8],
) -> Vec<u8> {
    let boundary = format!(
        "=_{:016x}{:016x}",
        crate::dns::random_u64(),
        crate::dns::random_u64()
    );
    let (report_type, status_type) = if envelope.global {
        ("global-delivery-status", "message/global-delivery-status")
    } else {
        ("delivery-status", "message/delivery-status")
    };
    let Envelope {
        hostname,
        sender,
        subject,
        id,
        ..
    } = envelope;
    let mut body = format!(
        "From: Mail Delivery System <MAILER-DAEMON@{hostname}>\n\
         To: <{sender}>\n\
         Subject: {subject}\n\
         Date: {date}\n\
         Message-ID: <{id}@{hostname}>\n\
         Auto-Submitted: auto-replied\n\
         MIME-Version: 1.0\n\
         Content-Type: multipart/report; report-type={report_type};\n\
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
         Content-Type: {status_type}\n\
         Content-Description: Delivery report\n\
         \n\
         {status}\n\
         --{boundary}\n\
         Content-Type: {returned_type}\n\
         Content-Description: {description}\n\
         \n",
        date = rfc5322_date(envelope.date),
        description = if returned_type.ends_with("headers") {
            "Headers of the original message"
        } else {
            "The original message"
        },
    )
    .replace('\n', "\r\n")
    .into_bytes();
    body.extend_from_slice(returned);
    if !body.ends_with(b"\r\n") {
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    body
}

/// The third part of a notice: the whole original when RET=FULL asked for
/// it on a failure report and it fits, else its header section, capped.
/// Returns the part's content type, its bytes and a note for the reader.
fn returned_content(
    message: &StoredMessage,
    kind: NoticeKind,
    global: bool,
) -> (&'static str, Vec<u8>, Option<String>) {
    let full_wanted = kind == NoticeKind::Failed && message.ret == Some(Ret::Full);
    let whole = message.head.len() as u64 == message.size;
    if full_wanted && whole && message.head.len() <= MAX_RETURNED_MESSAGE {
        let content_type = if global {
            "message/global"
        } else {
            "message/rfc822"
        };
        return (content_type, message.head.clone(), None);
    }
    let headers_type = if global {
        "message/global-headers"
    } else {
        "text/rfc822-headers"
    };
    let (headers, cut) = capped_headers(&message.head, MAX_RETURNED_HEADERS);
    let mut note = None;
    if full_wanted {
        note = Some(format!(
            "The message was larger than {} KiB, so only its headers are returned.",
            MAX_RETURNED_MESSAGE / 1024
        ));
    } else if cut {
        note = Some(format!(
            "The original header section was longer than {} KiB; only its start is returned.",
            MAX_RETURNED_HEADERS / 1024
        ));
    }
    (headers_type, headers.to_vec(), note)
}

/// The header section of a message, at most `limit` octets, cut at the end
/// of a header field (a line not followed by a continuation line). Returns
/// whether anything was cut.
pub fn capped_headers(content: &[u8], limit: usize) -> (&[u8], bool) {
    let section = &content[..header_section_len(content)];
    if section.len() <= limit {
        return (section, false);
    }
    let mut end = 0;
    let mut position = 0;
    while let Some(offset) = section[position..].iter().position(|&b| b == b'\n') {
        let line_end = position + offset + 1;
        if line_end > limit {
            break;
        }
        let next = section.get(line_end).copied();
        if !matches!(next, Some(b' ') | Some(b'\t')) {
            end = line_end;
        }
        position = line_end;
    }
    (&section[..end], true)
}

/// The Original-Recipient field: ORCPT as the client gave it ("rfc822;a@b"),
/// else the RCPT TO address when an alias or case change made the final one.
pub fn original_recipient(orcpt: Option<&str>, rcpt: Option<&str>) -> Option<String> {
    orcpt
        .map(str::to_string)
        .or_else(|| rcpt.map(address_field))
}

/// "rfc822; addr", or "utf-8; addr" for an internationalised address
/// (RFC 6533 3).
fn address_field(address: &str) -> String {
    if address.is_ascii() {
        format!("rfc822; {address}")
    } else {
        format!("utf-8; {address}")
    }
}

/// Text from the network ends up in header-like fields: one line, and no
/// control characters.
fn one_line(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::Route;
    use std::time::Duration;

    #[test]
    fn a_typed_report_renders_every_field_as_one_line() {
        let at = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let report = StatusReport {
            reporting_mta: "mx.example.test".into(),
            envid: Some("env\r\nid".into()),
            queue_id: "Q1".into(),
            arrival: at,
            recipients: vec![RecipientReport {
                original: Some("rfc822; alias@example.test".into()),
                address: "bob@example.net".into(),
                action: Action::Delayed,
                status: "4.4.1".into(),
                remote_mta: Some("mx.example.net".into()),
                diagnostic: "451 try\r\nInjected: header".into(),
                last_attempt: at,
                will_retry_until: Some(at + Duration::from_secs(86_400)),
            }],
        };
        let text = report.render();
        let date = rfc5322_date(at);
        let until = rfc5322_date(at + Duration::from_secs(86_400));
        let expected = format!(
            "Reporting-MTA: dns; mx.example.test\n\
             Original-Envelope-Id: env  id\n\
             X-Petrel-Queue-ID: Q1\n\
             Arrival-Date: {date}\n\
             \n\
             Original-Recipient: rfc822; alias@example.test\n\
             Final-Recipient: rfc822; bob@example.net\n\
             Action: delayed\n\
             Status: 4.4.1\n\
             Remote-MTA: dns; mx.example.net\n\
             Diagnostic-Code: smtp; 451 try  Injected: header\n\
             Last-Attempt-Date: {date}\n\
             Will-Retry-Until: {until}\n"
        );
        assert_eq!(text, expected);
    }

    trait WithContent {
        fn with_content(self, content: &[u8]) -> Self;
    }

    impl WithContent for StoredMessage {
        /// As `load_message` would load it.
        fn with_content(mut self, content: &[u8]) -> Self {
            self.size = content.len() as u64;
            self.head = content[..content.len().min(MAX_RETURNED_MESSAGE)].to_vec();
            self
        }
    }

    fn message(sender: &str, kind: MessageKind) -> StoredMessage {
        StoredMessage {
            id: "0123456789ABCDEF".into(),
            sender: sender.into(),
            kind,
            received_at: SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_887_338),
            eight_bit: false,
            smtputf8: false,
            delay_warning_sent: false,
            ret: None,
            envid: None,
            size: 0,
            head: Vec::new(),
        }
        .with_content(
            b"Received: from x\r\nSubject: Hello\r\nFrom: a@example.org\r\n\r\nsecret body\r\n",
        )
    }

    fn problem() -> Problem {
        Problem {
            address: "bob@example.net".into(),
            original: original_recipient(None, Some("team@example.org")),
            diagnostic: "550 5.1.1 <bob@example.net>: no such user (in reply to RCPT TO)".into(),
            status: "5.1.1".into(),
            remote_mta: Some("mx.example.net[192.0.2.1]:25".into()),
            relayed: false,
        }
    }

    fn to(address: &str) -> Vec<Recipient> {
        let domain = address.rsplit_once('@').unwrap().1.to_string();
        vec![Recipient {
            address: address.into(),
            route: Route::Remote {
                domain: domain.clone(),
            },
            domain,
        }]
    }

    fn build(
        message: &StoredMessage,
        kind: NoticeKind,
        problems: &[Problem],
    ) -> Option<NewMessage> {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_890_000);
        notice(
            "mx.test",
            message,
            kind,
            problems,
            to(&message.sender),
            now,
            Some(now),
        )
    }

    fn text_of(notice: &NewMessage) -> String {
        let crate::queue::content::Body::Memory(body) = &notice.content.body else {
            panic!("notices are built in memory");
        };
        assert!(notice.content.prefix.is_empty());
        String::from_utf8(body.clone()).unwrap()
    }

    #[test]
    fn bounce_is_a_multipart_report_with_headers_only() {
        let notice = build(
            &message("a@example.org", MessageKind::Normal),
            NoticeKind::Failed,
            &[problem()],
        )
        .unwrap();
        assert_eq!(notice.sender, "");
        assert_eq!(notice.kind, MessageKind::Bounce);
        assert_eq!(notice.recipients[0].address, "a@example.org");
        let text = text_of(&notice);
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
    fn boundaries_are_unpredictable() {
        let message = message("a@example.org", MessageKind::Normal);
        let boundary = |n: &NewMessage| {
            let text = text_of(n);
            let start = text.find("boundary=\"").unwrap() + 10;
            text[start..start + text[start..].find('"').unwrap()].to_string()
        };
        let one = build(&message, NoticeKind::Failed, &[problem()]).unwrap();
        let two = build(&message, NoticeKind::Failed, &[problem()]).unwrap();
        assert_ne!(boundary(&one), boundary(&two));
        assert!(!boundary(&one).contains(&message.id));
        assert!(!boundary(&one).contains(one.id.as_str()));
    }

    #[test]
    fn returned_headers_are_capped_at_a_field_boundary() {
        let original = message("a@example.org", MessageKind::Normal);
        let mut headers = Vec::new();
        for n in 0..5000 {
            headers.extend_from_slice(
                format!("X-Filler-{n}: {}\r\n\tfolded\r\n", "z".repeat(40)).as_bytes(),
            );
        }
        let original = original.with_content(&headers);
        let notice = build(&original, NoticeKind::Failed, &[problem()]).unwrap();
        assert!(
            notice.content.len() < (MAX_RETURNED_HEADERS + 4096) as u64,
            "{}",
            notice.content.len()
        );
        let text = text_of(&notice);
        let returned = &text[text.find("X-Filler-0:").unwrap()..text.rfind("\r\n--").unwrap()];
        assert!(
            returned.ends_with("\tfolded\r\n"),
            "cut after a whole field"
        );
        assert!(text.contains("only its start is returned"));
    }

    #[test]
    fn ret_full_returns_the_message_when_it_fits() {
        let mut original = message("a@example.org", MessageKind::Normal);
        original.ret = Some(Ret::Full);
        original.envid = Some("QQ314159".into());
        let text = text_of(&build(&original, NoticeKind::Failed, &[problem()]).unwrap());
        assert!(text.contains("Content-Type: message/rfc822"));
        assert!(text.contains("secret body"));
        assert!(text.contains("Original-Envelope-Id: QQ314159"));
        // Too big: headers only, and the reader is told why.
        let mut big = original.head.clone();
        big.extend(std::iter::repeat_n(b'x', MAX_RETURNED_MESSAGE));
        let original = original.with_content(&big);
        let text = text_of(&build(&original, NoticeKind::Failed, &[problem()]).unwrap());
        assert!(text.contains("Content-Type: text/rfc822-headers"));
        assert!(!text.contains("secret body"));
        assert!(text.contains("only its headers are returned"));
        // Delay warnings never carry the body.
        let text = text_of(&build(&original, NoticeKind::Delayed, &[problem()]).unwrap());
        assert!(!text.contains("secret body"));
    }

    #[test]
    fn smtputf8_messages_get_global_reports() {
        let mut original = message("josé@example.org", MessageKind::Normal);
        original.smtputf8 = true;
        let mut p = problem();
        p.address = "bøb@example.net".into();
        let notice = build(&original, NoticeKind::Failed, &[p]).unwrap();
        assert!(notice.smtputf8);
        let text = text_of(&notice);
        assert!(text.contains("report-type=global-delivery-status"));
        assert!(text.contains("Content-Type: message/global-delivery-status"));
        assert!(text.contains("Content-Type: message/global-headers"));
        assert!(text.contains("Final-Recipient: utf-8; bøb@example.net"));
    }

    #[test]
    fn delay_warning_and_success_report() {
        let notice = build(
            &message("a@example.org", MessageKind::Normal),
            NoticeKind::Delayed,
            &[Problem {
                diagnostic: "451 4.4.1 connection refused".into(),
                status: "4.4.1".into(),
                remote_mta: None,
                ..problem()
            }],
        )
        .unwrap();
        assert_eq!(notice.kind, MessageKind::DelayWarning);
        let text = text_of(&notice);
        assert!(text.contains("Action: delayed"));
        assert!(text.contains("Status: 4.4.1"));
        assert!(text.contains("Will-Retry-Until: "));

        let relayed = Problem {
            relayed: true,
            status: "2.0.0".into(),
            ..problem()
        };
        let text = text_of(
            &build(
                &message("a@example.org", MessageKind::Normal),
                NoticeKind::Success,
                &[relayed],
            )
            .unwrap(),
        );
        assert!(text.contains("Action: relayed"));
    }

    #[test]
    fn never_to_the_null_sender_nor_about_a_notice() {
        for (sender, kind) in [
            ("", MessageKind::Normal),
            ("a@example.org", MessageKind::Bounce),
            ("a@example.org", MessageKind::DelayWarning),
        ] {
            let now = SystemTime::now();
            let message = message(sender, kind);
            let notice = notice(
                "mx.test",
                &message,
                NoticeKind::Failed,
                &[problem()],
                to("a@example.org"),
                now,
                None,
            );
            assert!(notice.is_none(), "{sender:?} {kind:?}");
        }
    }
}
