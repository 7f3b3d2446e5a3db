//! The session state machine's tests, without sockets.

use super::*;
use crate::protocol::data::{DataDecoder, Progress};
use crate::protocol::dsn::Ret;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use std::time::SystemTime;

/// A routed recipient as the tests need it: an address, and whether
/// it is one of our mailboxes.
#[derive(Debug, Clone, PartialEq, Eq)]
struct TestTarget {
    address: String,
    local: bool,
}

impl Target for TestTarget {
    fn address(&self) -> &str {
        &self.address
    }

    fn local_mailbox(&self) -> Option<&str> {
        self.local.then_some(self.address.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct TestKinds;

impl Kinds for TestKinds {
    type Target = TestTarget;
    type Verdict = ();
}

type TestSession = Session<TestKinds>;

/// Accepts everything under `localhost`; relays only when authenticated;
/// one account alice@localhost / "Correct-Horse-9".
struct FakeServices;

impl Services<TestKinds> for FakeServices {
    fn check_sender(
        &self,
        client: &ClientView,
        sender: &ReversePath,
    ) -> Result<SenderStanding<TestKinds>, Reply> {
        match (client.user, sender.address()) {
            (Some(user), Some(address)) if address.mailbox_key() != user => Err(Reply::new(
                reply::SENDER_NOT_OWNED,
                "Sender address not owned by user",
            )),
            _ => Ok(SenderStanding {
                accountable: client.user.is_some(),
                spf: None,
                from_owner: None,
            }),
        }
    }

    fn check_recipient(
        &self,
        client: &ClientView,
        recipient: &Address,
    ) -> Result<Vec<TestTarget>, Reply> {
        if recipient.domain().as_str() == "localhost" {
            if recipient.local_part() == "team" {
                return Ok(vec![local("alice@localhost"), remote("bob@example.org")]);
            }
            return Ok(vec![local(&recipient.mailbox_key())]);
        }
        if client.user.is_some() {
            return Ok(vec![remote(&recipient.to_string())]);
        }
        Err(Reply::new(reply::RELAY_DENIED, "Relay access denied"))
    }

    fn authenticate(
        &self,
        _client: &ClientView,
        _mechanism: &str,
        username: &str,
        password: &str,
    ) -> AuthVerdict {
        if username == "alice@localhost" && password == "Correct-Horse-9" {
            AuthVerdict::Success {
                account: username.to_string(),
                app_password: None,
            }
        } else if username == "alice@localhost" && password == "app-password" {
            AuthVerdict::Success {
                account: username.to_string(),
                app_password: Some("phone".into()),
            }
        } else if username == "alice@localhost" && password == "revoked-soon" {
            AuthVerdict::Success {
                account: username.to_string(),
                app_password: Some("revoked".into()),
            }
        } else {
            AuthVerdict::Failure {
                delay: Duration::from_millis(500),
            }
        }
    }

    fn is_locked_out(&self, ip: IpAddr) -> bool {
        ip == IpAddr::from([192, 0, 2, 66])
    }

    fn has_room(&self) -> bool {
        true
    }

    /// The app password "revoked" is revoked as soon as it is used.
    fn login_stands(&self, _account: &str, app_password: Option<&str>) -> bool {
        app_password != Some("revoked")
    }
}

fn local(mailbox: &str) -> TestTarget {
    TestTarget {
        address: mailbox.to_string(),
        local: true,
    }
}

fn remote(address: &str) -> TestTarget {
    TestTarget {
        address: address.to_string(),
        local: false,
    }
}

fn stamp() -> Stamp {
    Stamp {
        id: "0123456789ABCDEF".into(),
        now: SystemTime::now(),
    }
}

fn config(listener: ListenerKind) -> Arc<SessionConfig> {
    Arc::new(SessionConfig {
        hostname: "mx.test".into(),
        listener,
        max_message_size: 1000,
        max_recipients: 3,
        max_errors: 10,
        soft_errors: 10,
        tls_available: true,
        postmaster: Address::parse("postmaster@localhost").ok(),
        max_header_size: 500,
        max_hops: 5,
    })
}

fn session() -> TestSession {
    TestSession::new(
        config(ListenerKind::Smtp),
        IpAddr::from([127, 0, 0, 1]),
        None,
    )
}

fn tls_info() -> TlsInfo {
    TlsInfo {
        version: "TLSv1_3".into(),
        cipher: "TLS13_AES_256_GCM_SHA384".into(),
    }
}

/// Sends one line, returns the codes of the replies.
fn send(session: &mut TestSession, line: &str) -> (Vec<u16>, Action<TestKinds>) {
    let step = session.handle_line(line.as_bytes(), &FakeServices);
    (step.replies.iter().map(Reply::code).collect(), step.action)
}

fn code(session: &mut TestSession, line: &str) -> u16 {
    let (codes, _) = send(session, line);
    assert_eq!(codes.len(), 1, "{line}: {codes:?}");
    codes[0]
}

/// A stranger's session after EHLO, MAIL, RCPT to alice and DATA (354).
fn at_data() -> TestSession {
    let mut s = session();
    code(&mut s, "EHLO c");
    code(&mut s, "MAIL FROM:<a@example.org>");
    code(&mut s, "RCPT TO:<alice@localhost>");
    code(&mut s, "DATA");
    s
}

/// [`at_data`], then a message the session handed to the queue.
fn handed_to_queue() -> TestSession {
    let mut s = at_data();
    let step = finish_data(&mut s, b"x\r\n.\r\n");
    assert!(matches!(step.action, Action::Enqueue(_)));
    s
}

fn finish_data(session: &mut TestSession, data: &[u8]) -> Step<TestKinds> {
    let mut decoder = DataDecoder::new(1000, crate::protocol::data::MAX_TEXT_LINE);
    let mut body = Vec::new();
    assert!(matches!(
        decoder.feed(data, &mut body),
        Progress::Done { .. }
    ));
    session.data_finished(decoder.finish(), stamp())
}

fn deliver(session: &mut TestSession, data: &[u8]) -> Envelope<TestKinds> {
    let step = finish_data(session, data);
    let Action::Enqueue(message) = step.action else {
        panic!("expected Enqueue, got {:?}", step.replies);
    };
    assert!(step.replies.is_empty(), "250 must wait for the queue");
    let step = session.enqueued(Ok(()));
    assert_eq!(step.replies[0].code(), 250);
    assert!(step.replies[0].lines[0].contains(&message.id));
    *message
}

#[test]
fn full_transaction() {
    let mut s = session();
    assert_eq!(s.greeting().code(), 220);
    assert_eq!(code(&mut s, "EHLO client.test"), 250);
    assert_eq!(code(&mut s, "MAIL FROM:<sender@example.org> SIZE=100"), 250);
    assert_eq!(code(&mut s, "RCPT TO:<alice@localhost>"), 250);
    assert_eq!(code(&mut s, "RCPT TO:<Postmaster>"), 250);
    let (codes, action) = send(&mut s, "DATA");
    assert_eq!(codes, vec![354]);
    assert!(matches!(action, Action::ReceiveData));
    let message = deliver(&mut s, b"Subject: hi\r\n\r\nHello\r\n.\r\n");
    assert_eq!(message.sender, "sender@example.org");
    let to: Vec<&str> = message
        .recipients
        .iter()
        .map(|r| r.target.address.as_str())
        .collect();
    assert_eq!(to, vec!["alice@localhost", "postmaster@localhost"]);
    let text = String::from_utf8(message.trace_header).unwrap();
    assert!(text.starts_with(
        "Received: from client.test ([127.0.0.1])\r\n\tby mx.test (petrel) with ESMTP id "
    ));
    assert!(text.ends_with(" +0000\r\n"), "{text}");
    assert_eq!(
        message.body_size,
        b"Subject: hi\r\n\r\nHello\r\n".len() as u64
    );
    assert!(!text.contains("for <"), "two recipients: no 'for' clause");
    // The transaction is over; a new one needs MAIL again.
    assert_eq!(code(&mut s, "RCPT TO:<alice@localhost>"), 503);
    let (codes, action) = send(&mut s, "QUIT");
    assert_eq!(codes, vec![221]);
    assert!(matches!(action, Action::Close));
}

#[test]
fn ehlo_advertises_extensions() {
    let mut s = session();
    let step = s.handle_line(b"EHLO c", &FakeServices);
    let lines = &step.replies[0].lines;
    for extension in [
        "PIPELINING",
        "SIZE 1000",
        "8BITMIME",
        "ENHANCEDSTATUSCODES",
        "SMTPUTF8",
        "DSN",
        "STARTTLS",
    ] {
        assert!(
            lines.iter().any(|l| l == extension),
            "{extension} missing: {lines:?}"
        );
    }
    assert!(
        !lines.iter().any(|l| l.starts_with("AUTH")),
        "no AUTH before TLS"
    );
    s.tls_started(tls_info());
    let step = s.handle_line(b"EHLO c", &FakeServices);
    let lines = &step.replies[0].lines;
    assert!(lines.iter().any(|l| l == "AUTH PLAIN LOGIN"));
    assert!(!lines.iter().any(|l| l == "STARTTLS"));
}

#[test]
fn helo_gets_a_single_line_and_no_extensions() {
    let mut s = session();
    let step = s.handle_line(b"HELO c", &FakeServices);
    assert_eq!(step.replies[0].lines.len(), 1);
    assert_eq!(code(&mut s, "MAIL FROM:<a@example.org> SIZE=10"), 555);
    assert_eq!(code(&mut s, "MAIL FROM:<a@example.org>"), 250);
}

#[test]
fn bad_sequences() {
    let mut s = session();
    assert_eq!(code(&mut s, "MAIL FROM:<a@example.org>"), 503);
    assert_eq!(code(&mut s, "EHLO c"), 250);
    assert_eq!(code(&mut s, "RCPT TO:<alice@localhost>"), 503);
    assert_eq!(code(&mut s, "DATA"), 503);
    assert_eq!(code(&mut s, "MAIL FROM:<a@example.org>"), 250);
    assert_eq!(code(&mut s, "MAIL FROM:<a@example.org>"), 503);
    assert_eq!(code(&mut s, "DATA"), 503, "no valid recipients");
    assert_eq!(code(&mut s, "RSET"), 250);
    assert_eq!(code(&mut s, "RCPT TO:<alice@localhost>"), 503);
}

#[test]
fn misc_commands() {
    let mut s = session();
    assert_eq!(code(&mut s, "NOOP"), 250);
    assert_eq!(code(&mut s, "VRFY alice"), 252);
    assert_eq!(code(&mut s, "EXPN list"), 502);
    assert_eq!(code(&mut s, "HELP"), 214);
    assert_eq!(code(&mut s, "BOGUS"), 500);
    assert_eq!(code(&mut s, &format!("NOOP {}", "x".repeat(600))), 500);
}

#[test]
fn size_is_checked_at_mail() {
    let mut s = session();
    code(&mut s, "EHLO c");
    assert_eq!(code(&mut s, "MAIL FROM:<a@example.org> SIZE=1001"), 552);
    assert_eq!(code(&mut s, "MAIL FROM:<a@example.org> SIZE=1000"), 250);
}

#[test]
fn refused_data_resets_the_transaction() {
    let mut s = at_data();
    let step = s.data_finished(Err(DataError::TooLarge), stamp());
    assert_eq!(step.replies[0].code(), 552);
    code(&mut s, "MAIL FROM:<a@example.org>");
    code(&mut s, "RCPT TO:<alice@localhost>");
    code(&mut s, "DATA");
    let step = s.data_finished(Err(DataError::BareLineFeed), stamp());
    assert_eq!(step.replies[0].code(), 554);
    assert_eq!(code(&mut s, "DATA"), 503);
}

#[test]
fn queue_failure_is_a_temporary_error() {
    let mut s = handed_to_queue();
    assert_eq!(
        s.enqueued(Err(NotQueued::Failed("disk full".into())))
            .replies[0]
            .code(),
        451
    );
}

#[test]
fn a_message_refused_by_a_check_is_a_logged_rejection() {
    let mut s = handed_to_queue();
    let refusal = Reply::new(reply::DMARC_REJECT, "DMARC says no");
    let step = s.enqueued(Err(NotQueued::Refused(refusal)));
    assert_eq!(step.replies[0].to_wire(), "550 5.7.1 DMARC says no\r\n");
    let rejection = step.rejected.expect("logged as a rejection");
    assert_eq!(rejection.stage, "END-OF-MESSAGE");
    assert_eq!(rejection.from.as_deref(), Some("a@example.org"));
    assert_eq!(rejection.to.as_deref(), Some("alice@localhost"));
    // The session goes on: the next transaction is possible.
    assert_eq!(code(&mut s, "MAIL FROM:<a@example.org>"), 250);
}

#[test]
fn too_many_recipients() {
    let mut s = session();
    code(&mut s, "EHLO c");
    code(&mut s, "MAIL FROM:<a@example.org>");
    for n in 0..3 {
        assert_eq!(code(&mut s, &format!("RCPT TO:<u{n}@localhost>")), 250);
    }
    assert_eq!(code(&mut s, "RCPT TO:<u9@localhost>"), 452);
}

#[test]
fn relay_is_refused_without_auth() {
    let mut s = session();
    code(&mut s, "EHLO c");
    code(&mut s, "MAIL FROM:<a@example.org>");
    let step = s.handle_line(b"RCPT TO:<x@elsewhere.example>", &FakeServices);
    assert_eq!(step.replies[0].code(), 554);
    let rejected = step.rejected.expect("refusals are marked for the log");
    assert_eq!(rejected.stage, "RCPT");
    assert_eq!(rejected.from.as_deref(), Some("a@example.org"));
    assert_eq!(rejected.to.as_deref(), Some("x@elsewhere.example"));
    assert_eq!(rejected.helo.as_deref(), Some("c"));
    let accepted = s.handle_line(b"RCPT TO:<alice@localhost>", &FakeServices);
    assert!(accepted.rejected.is_none());
}

#[test]
fn aliases_expand_and_deduplicate() {
    let mut s = session();
    code(&mut s, "EHLO c");
    code(&mut s, "MAIL FROM:<a@example.org>");
    code(&mut s, "RCPT TO:<team@localhost>");
    code(&mut s, "RCPT TO:<alice@localhost>");
    code(&mut s, "DATA");
    let message = deliver(&mut s, b"x\r\n.\r\n");
    let recipients: Vec<(&str, Option<&str>)> = message
        .recipients
        .iter()
        .map(|r| (r.target.address.as_str(), r.original.as_deref()))
        .collect();
    assert_eq!(
        recipients,
        vec![
            ("alice@localhost", Some("team@localhost")),
            ("bob@example.org", Some("team@localhost")),
        ]
    );
}

#[test]
fn mixed_case_local_recipients_become_their_mailbox() {
    let mut s = session();
    code(&mut s, "EHLO c");
    code(&mut s, "MAIL FROM:<a@example.org>");
    code(&mut s, "RCPT TO:<ALICE@localhost>");
    code(&mut s, "RCPT TO:<alice@LOCALHOST>");
    code(&mut s, "DATA");
    let message = deliver(&mut s, b"x\r\n.\r\n");
    assert_eq!(message.recipients.len(), 1, "one mailbox, delivered once");
    let recipient = &message.recipients[0];
    assert_eq!(recipient.target.address, "alice@localhost");
    assert_eq!(recipient.target.local_mailbox(), Some("alice@localhost"));
    assert_eq!(recipient.original.as_deref(), Some("ALICE@localhost"));
}

fn refused_at_end_of_data(data: &[u8]) -> Reply {
    let mut s = at_data();
    let step = finish_data(&mut s, data);
    assert!(matches!(step.action, Action::Continue), "nothing queued");
    assert_eq!(code(&mut s, "DATA"), 503, "the transaction is over");
    step.replies[0].clone()
}

#[test]
fn hop_count_header_size_and_loops_are_refused_at_end_of_data() {
    let hops = "Received: x\r\n".repeat(5) + "\r\nbody\r\n.\r\n";
    let reply = refused_at_end_of_data(hops.as_bytes());
    assert_eq!(reply.to_wire().get(..10), Some("554 5.4.6 "), "{reply:?}");
    assert!(reply.lines[0].contains("Too many hops"));

    let big = format!("X-Big: {}\r\n\r\n.\r\n", "y".repeat(600));
    let reply = refused_at_end_of_data(big.as_bytes());
    assert_eq!(reply.to_wire().get(..10), Some("552 5.3.4 "), "{reply:?}");
    assert!(reply.lines[0].contains("header section"));

    let looped = b"Delivered-To: ALICE@localhost\r\n\r\nx\r\n.\r\n";
    let reply = refused_at_end_of_data(looped);
    assert_eq!(reply.to_wire().get(..10), Some("554 5.4.6 "), "{reply:?}");
    assert!(reply.lines[0].contains("loop"));

    // Just under every limit: accepted.
    let mut s = at_data();
    let fine = "Received: x\r\n".repeat(4) + "Delivered-To: bob@localhost\r\n\r\n.\r\n";
    deliver(&mut s, fine.as_bytes());
}

#[test]
fn success_reports_only_for_accountable_senders() {
    let mut s = session();
    code(&mut s, "EHLO c");
    code(&mut s, "MAIL FROM:<a@example.org> RET=FULL ENVID=abc");
    code(
        &mut s,
        "RCPT TO:<alice@localhost> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;A+40localhost",
    );
    code(&mut s, "DATA");
    let message = deliver(&mut s, b"x\r\n.\r\n");
    assert_eq!(message.ret, Some(Ret::Full));
    assert_eq!(message.envid.as_deref(), Some("abc"));
    let recipient = &message.recipients[0];
    assert_eq!(
        recipient.notify,
        Some(Notify {
            success: false,
            failure: true,
            delay: false
        }),
        "a stranger cannot order success reports"
    );
    assert_eq!(recipient.orcpt.as_deref(), Some("rfc822;A@localhost"));

    let mut s = tls_session(ListenerKind::Submission);
    let plain = BASE64.encode("\0alice@localhost\0Correct-Horse-9");
    code(&mut s, &format!("AUTH PLAIN {plain}"));
    code(&mut s, "MAIL FROM:<alice@localhost>");
    code(&mut s, "RCPT TO:<x@elsewhere.example> NOTIFY=SUCCESS");
    code(&mut s, "DATA");
    let message = deliver(&mut s, b"x\r\n.\r\n");
    assert!(message.recipients[0].notify.is_some_and(|n| n.success));
}

#[test]
fn utf8_addresses_need_smtputf8() {
    let mut s = session();
    code(&mut s, "EHLO c");
    assert_eq!(code(&mut s, "MAIL FROM:<José@example.org>"), 553);
    assert_eq!(code(&mut s, "MAIL FROM:<a@example.org>"), 250);
    assert_eq!(code(&mut s, "RCPT TO:<josé@localhost>"), 553);
    code(&mut s, "RSET");
    assert_eq!(code(&mut s, "MAIL FROM:<José@example.org> SMTPUTF8"), 250);
    assert_eq!(code(&mut s, "RCPT TO:<josé@localhost>"), 250);
    code(&mut s, "DATA");
    let message = deliver(&mut s, b"x\r\n.\r\n");
    assert!(message.smtputf8);
    assert!(
        String::from_utf8(message.trace_header)
            .unwrap()
            .contains("with UTF8SMTP id")
    );
}

#[test]
fn too_many_errors_closes() {
    let mut s = session();
    for _ in 0..9 {
        let (codes, action) = send(&mut s, "BOGUS");
        assert_eq!(codes, vec![500]);
        assert!(matches!(action, Action::Continue));
    }
    let (codes, action) = send(&mut s, "BOGUS");
    assert_eq!(codes, vec![500, 421]);
    assert!(matches!(action, Action::Close));
}

#[test]
fn starttls_resets_state() {
    let mut s = session();
    code(&mut s, "EHLO c");
    code(&mut s, "MAIL FROM:<a@example.org>");
    let (codes, action) = send(&mut s, "STARTTLS");
    assert_eq!(codes, vec![220]);
    assert!(matches!(action, Action::StartTls));
    s.tls_started(tls_info());
    assert_eq!(
        code(&mut s, "MAIL FROM:<a@example.org>"),
        503,
        "EHLO needed again"
    );
    assert_eq!(code(&mut s, "EHLO c"), 250);
    assert_eq!(code(&mut s, "STARTTLS"), 503);
}

#[test]
fn starttls_without_certificate() {
    let mut s = TestSession::new(
        Arc::new(SessionConfig {
            tls_available: false,
            ..(*config(ListenerKind::Smtp)).clone()
        }),
        IpAddr::from([127, 0, 0, 1]),
        None,
    );
    code(&mut s, "EHLO c");
    assert_eq!(code(&mut s, "STARTTLS"), 454);
}

#[test]
fn auth_needs_tls() {
    let mut s = session();
    code(&mut s, "EHLO c");
    assert_eq!(
        code(
            &mut s,
            "AUTH PLAIN AGFsaWNlQGxvY2FsaG9zdABDb3JyZWN0LUhvcnNlLTk="
        ),
        538
    );
    assert!(s.authenticated_user().is_none());
}

fn tls_session(listener: ListenerKind) -> TestSession {
    let mut s = TestSession::new(
        config(listener),
        IpAddr::from([127, 0, 0, 1]),
        Some(tls_info()),
    );
    code(&mut s, "EHLO c");
    s
}

#[test]
fn auth_plain_initial_response() {
    let mut s = tls_session(ListenerKind::Submission);
    assert_eq!(code(&mut s, "MAIL FROM:<alice@localhost>"), 530);
    let plain = BASE64.encode("\0alice@localhost\0Correct-Horse-9");
    assert_eq!(code(&mut s, &format!("AUTH PLAIN {plain}")), 235);
    assert_eq!(s.authenticated_user(), Some("alice@localhost"));
    assert_eq!(code(&mut s, "AUTH PLAIN {plain}"), 503);
    assert_eq!(code(&mut s, "MAIL FROM:<bob@localhost>"), 553);
    assert_eq!(code(&mut s, "MAIL FROM:<alice@localhost>"), 250);
    assert_eq!(
        code(&mut s, "RCPT TO:<x@elsewhere.example>"),
        250,
        "authenticated relay"
    );
    code(&mut s, "DATA");
    let message = deliver(&mut s, b"x\r\n.\r\n");
    assert_eq!(message.auth_user.as_deref(), Some("alice@localhost"));
    let text = String::from_utf8(message.trace_header).unwrap();
    assert!(text.contains("with ESMTPSA id"), "{text}");
    assert!(
        text.contains("(using TLSv1_3 with cipher TLS13_AES_256_GCM_SHA384)"),
        "{text}"
    );
    assert!(text.contains("for <x@elsewhere.example>"), "{text}");
}

#[test]
fn a_session_whose_app_password_is_revoked_sends_nothing_more() {
    let mut s = tls_session(ListenerKind::Submission);
    let plain = BASE64.encode("\0alice@localhost\0revoked-soon");
    assert_eq!(code(&mut s, &format!("AUTH PLAIN {plain}")), 235);
    assert_eq!(code(&mut s, "MAIL FROM:<alice@localhost>"), 530);
    assert!(s.authenticated_user().is_none(), "logged out");
    // The next transaction needs a login that stands.
    assert_eq!(code(&mut s, "MAIL FROM:<alice@localhost>"), 530);
    let plain = BASE64.encode("\0alice@localhost\0Correct-Horse-9");
    assert_eq!(code(&mut s, &format!("AUTH PLAIN {plain}")), 235);
    assert_eq!(code(&mut s, "MAIL FROM:<alice@localhost>"), 250);
}

#[test]
fn submission_adds_a_missing_date_and_message_id_the_mx_port_does_not() {
    let mut s = tls_session(ListenerKind::Submission);
    let plain = BASE64.encode("\0alice@localhost\0Correct-Horse-9");
    code(&mut s, &format!("AUTH PLAIN {plain}"));
    code(&mut s, "MAIL FROM:<alice@localhost>");
    code(&mut s, "RCPT TO:<bob@localhost>");
    code(&mut s, "DATA");
    let message = deliver(&mut s, b"Subject: bare\r\n\r\nx\r\n.\r\n");
    let text = String::from_utf8(message.trace_header).unwrap();
    assert!(text.contains("\r\nDate: "), "{text}");
    assert!(
        text.contains(&format!("\r\nMessage-ID: <{}@mx.test>\r\n", message.id)),
        "{text}"
    );

    code(&mut s, "MAIL FROM:<alice@localhost>");
    code(&mut s, "RCPT TO:<bob@localhost>");
    code(&mut s, "DATA");
    let message = deliver(
        &mut s,
        b"Date: Sun, 1 Nov 2026 10:00:00 +0000\r\nMessage-ID: <own@x>\r\n\r\nx\r\n.\r\n",
    );
    let text = String::from_utf8(message.trace_header).unwrap();
    assert!(
        !text.contains("Date:") && !text.contains("Message-ID:"),
        "{text}"
    );

    let mut mx = session();
    code(&mut mx, "EHLO c");
    code(&mut mx, "MAIL FROM:<a@example.org>");
    code(&mut mx, "RCPT TO:<alice@localhost>");
    code(&mut mx, "DATA");
    let message = deliver(&mut mx, b"Subject: bare\r\n\r\nx\r\n.\r\n");
    let text = String::from_utf8(message.trace_header).unwrap();
    assert!(
        !text.contains("Date:") && !text.contains("Message-ID:"),
        "{text}"
    );
}

#[test]
fn auth_plain_with_challenge_and_login() {
    let mut s = tls_session(ListenerKind::Smtps);
    let step = s.handle_line(b"AUTH PLAIN", &FakeServices);
    assert_eq!(step.replies[0].to_wire(), "334 \r\n");
    let plain = BASE64.encode("alice@localhost\0alice@localhost\0Correct-Horse-9");
    assert_eq!(code(&mut s, &plain), 235);

    let mut s = tls_session(ListenerKind::Smtps);
    let step = s.handle_line(b"AUTH LOGIN", &FakeServices);
    assert_eq!(step.replies[0].to_wire(), "334 VXNlcm5hbWU6\r\n");
    let step = s.handle_line(BASE64.encode("alice@localhost").as_bytes(), &FakeServices);
    assert_eq!(step.replies[0].to_wire(), "334 UGFzc3dvcmQ6\r\n");
    assert_eq!(code(&mut s, &BASE64.encode("Correct-Horse-9")), 235);
}

#[test]
fn auth_failures() {
    let mut s = tls_session(ListenerKind::Submission);
    let step = s.handle_line(
        format!("AUTH PLAIN {}", BASE64.encode("\0alice@localhost\0wrong")).as_bytes(),
        &FakeServices,
    );
    assert_eq!(step.replies[0].code(), 535);
    assert_eq!(step.delay, Some(Duration::from_millis(500)));
    assert_eq!(code(&mut s, "AUTH PLAIN !!!notbase64"), 501);
    assert_eq!(
        code(&mut s, &format!("AUTH PLAIN {}", BASE64.encode("no-nuls"))),
        501
    );
    assert_eq!(code(&mut s, "AUTH CRAM-MD5"), 504);
    code(&mut s, "AUTH LOGIN");
    assert_eq!(code(&mut s, "*"), 501, "cancelled");
    assert_eq!(code(&mut s, "NOOP"), 250, "back in command mode");
    let plain = BASE64.encode("bob@localhost\0alice@localhost\0Correct-Horse-9");
    assert_eq!(
        code(&mut s, &format!("AUTH PLAIN {plain}")),
        535,
        "no proxy auth"
    );
}

#[test]
fn locked_out_address_is_dropped() {
    let mut s = TestSession::new(
        config(ListenerKind::Submission),
        IpAddr::from([192, 0, 2, 66]),
        Some(tls_info()),
    );
    code(&mut s, "EHLO c");
    let (codes, action) = send(&mut s, "AUTH LOGIN");
    assert_eq!(codes, vec![421]);
    assert!(matches!(action, Action::Close));
}
