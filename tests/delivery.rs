//! Delivery end to end: petrel A delivering over real SMTP (MX found in a
//! DNS server on loopback, `delivery.port` pointed at the peer) to a second
//! petrel or to Python's aiosmtpd, locally into Maildirs, through a smart
//! host with STARTTLS and AUTH; retries, bounces, delay warnings.

mod common;

use std::path::{Path, PathBuf};

use common::sink::{Sink, free_port};
use common::*;
use petrel::config::{HumanDuration, SmarthostTls};
use petrel::protocol::session::ListenerKind;

fn wait_for_maildir(data_dir: &Path, address: &str, count: usize) -> Vec<String> {
    wait_for(&format!("{count} messages in {address}'s Maildir"), || {
        maildir_messages(data_dir, address).len() >= count
    });
    maildir_messages(data_dir, address)
        .iter()
        .map(|p| std::fs::read_to_string(p).unwrap())
        .collect()
}

fn queue_is_empty(server: &TestServer) -> bool {
    server.message_count() == 0
}

/// Submits a message as alice (implicit TLS + AUTH) and returns its id.
fn submit(server: &TestServer, to: &[&str], body: &[u8]) -> String {
    let mut client = RawClient::implicit_tls(server.addr(ListenerKind::Smtps), &server.cert_path());
    client.command("EHLO client.test");
    assert_eq!(client.auth_plain("alice@example.test", PASSWORD).code, 235);
    let reply = client.send_transaction("alice@example.test", to, body);
    assert_eq!(reply.code, 250, "{reply:?}");
    client.command("QUIT");
    queue_id_from(&reply.text())
}

/// Waits for the message's first failed attempt to be recorded (its
/// recipient queued again) and returns the reply it got.
fn first_failed_reply(server: &TestServer, id: &str) -> String {
    wait_for("the failed attempt to be recorded", || {
        server
            .db()
            .query_row(
                "SELECT attempts FROM recipients WHERE message_id = ?1 AND status = 'queued'",
                [id],
                |r| r.get::<_, i64>(0),
            )
            .unwrap_or(0)
            == 1
    });
    server
        .db()
        .query_row(
            "SELECT last_reply FROM recipients WHERE message_id = ?1",
            [id],
            |r| r.get(0),
        )
        .unwrap()
}

/// Drops the trace headers petrel adds (Return-Path, Delivered-To, every
/// Received and Authentication-Results) from the top of a Maildir message.
fn without_trace_headers(message: &str) -> String {
    let mut lines = message.split_inclusive('\n').peekable();
    let mut out = String::new();
    let mut skipping = true;
    while let Some(line) = lines.next() {
        if skipping {
            let is_trace = [
                "Return-Path:",
                "Delivered-To:",
                "Received:",
                "Authentication-Results:",
            ]
            .iter()
            .any(|h| line.starts_with(h));
            if is_trace {
                while lines.peek().is_some_and(|l| l.starts_with([' ', '\t'])) {
                    lines.next();
                }
                continue;
            }
            skipping = false;
        }
        out.push_str(line);
    }
    out
}

#[test]
fn petrel_to_petrel_via_mx_arrives_byte_exact() {
    // B is the MX for elsewhere.example and delivers into a Maildir.
    let b = TestServer::start_delivering(standard_dns(), |config| {
        config.domains.local = vec!["elsewhere.example".into()];
    });
    add_accounts(
        &b.instance().config().data_dir,
        &["friend@elsewhere.example"],
    );
    let b_port = b.smtp().port();
    let a = TestServer::start_delivering(standard_dns(), |config| {
        config.delivery.port = b_port;
    });

    // A complete message (Date and Message-ID present), so submission adds
    // nothing and what arrives is byte for byte what was sent.
    let original: &[u8] = b"From: Alice <alice@example.test>\r\nTo: friend@elsewhere.example\r\n\
        Date: Sun, 29 Nov 2026 10:00:00 +0000\r\nMessage-ID: <across@example.test>\r\n\
        Subject: across two servers\r\n\r\n.dot first\r\n..two dots\r\nTabs\tand  spaces \r\n\r\nend\r\n";
    let id = submit(&a, &["friend@elsewhere.example"], &dot_stuff(original));
    let received = wait_for_maildir(
        &b.instance().config().data_dir,
        "friend@elsewhere.example",
        1,
    );
    let expected = String::from_utf8(original.to_vec())
        .unwrap()
        .replace("\r\n", "\n");
    assert_eq!(without_trace_headers(&received[0]), expected);
    // Trace: A's Received header (with A's queue id) and B's, which shows
    // the hop between them was encrypted (opportunistic STARTTLS).
    assert!(
        received[0].starts_with("Return-Path: <alice@example.test>\n"),
        "{}",
        received[0]
    );
    assert!(
        received[0].contains(&format!("with ESMTPSA id {id}")),
        "{}",
        received[0]
    );
    assert!(
        received[0].contains("with ESMTPS id"),
        "A to B used TLS: {}",
        received[0]
    );
    wait_for("A's queue to empty", || queue_is_empty(&a));
}

#[test]
fn temporary_failure_is_retried_after_backoff() {
    let sink = Sink::start("tempfail-once", 0);
    let port = sink.port;
    let a = TestServer::start_delivering(standard_dns(), |config| {
        config.delivery.port = port;
        config.queue.retry_min = HumanDuration::secs(2);
        config.queue.retry_max = HumanDuration::secs(4);
    });
    let id = submit(
        &a,
        &["friend@elsewhere.example"],
        b"Subject: retry me\r\n\r\nx\r\n",
    );
    // First attempt: deferred, with the 451 recorded and a later retry.
    wait_for("the first attempt to be recorded", || {
        a.db()
            .query_row(
                "SELECT attempts = 1 AND status = 'queued' AND last_reply LIKE '451 4.3.0%'
                        AND next_attempt_at > last_attempt_at
                 FROM recipients WHERE message_id = ?1",
                [&id],
                |r| r.get::<_, bool>(0),
            )
            .unwrap_or(false)
    });
    let messages = sink.wait_for_messages(1);
    assert_eq!(sink.data_attempts(), 2);
    assert_eq!(messages[0].rcpt_to, vec!["friend@elsewhere.example"]);
    assert_eq!(messages[0].mail_from, "alice@example.test");
    wait_for("A's queue to empty", || queue_is_empty(&a));
}

/// Postfix's connection cache: messages to one destination share
/// connections, none is sent twice, and idle connections are closed.
#[test]
fn messages_to_one_destination_share_connections_that_close_when_idle() {
    share_connections("accept");
}

/// ... also where RSET travels in one write with MAIL FROM.
#[test]
fn pipelined_messages_share_connections_too() {
    share_connections("accept+pipelining");
}

fn share_connections(mode: &str) {
    let sink = Sink::start(mode, 0);
    let port = sink.port;
    let a = TestServer::start_delivering(standard_dns(), |config| {
        config.delivery.port = port;
        config.delivery.connection_idle = HumanDuration::secs(1);
        config.relay.trusted_networks = vec!["127.0.0.0/8".parse().unwrap()];
    });
    let mut client = RawClient::greeted(a.smtp());
    client.command("EHLO client.test");
    const MESSAGES: usize = 20;
    for n in 0..MESSAGES {
        let body = format!("Subject: number {n}\r\n\r\nx\r\n");
        let reply = client.send_transaction(
            "sender@example.test",
            &["friend@elsewhere.example"],
            body.as_bytes(),
        );
        assert_eq!(reply.code, 250, "{reply:?}");
    }
    client.command("QUIT");
    let received = sink.wait_for_messages(MESSAGES);
    wait_for("A's queue to empty", || queue_is_empty(&a));
    assert_eq!(received.len(), MESSAGES, "each message arrived once");
    assert_eq!(sink.data_attempts(), MESSAGES, "and was sent once");
    let (opened, _) = sink.connections();
    assert!(
        opened < MESSAGES,
        "{MESSAGES} messages took {opened} connections"
    );
    // None stays open past connection_idle (polled, within the wait bound).
    wait_for("idle connections to be closed", || {
        let (opened, closed) = sink.connections();
        closed == opened
    });
    assert_eq!(a.instance().delivery_connections_idle(), Some(0));
}

/// A cached connection that the server has closed meanwhile (its idle
/// timeout was shorter than ours) is noticed before the message is sent;
/// the message goes over a new connection at once, not at the next retry.
#[test]
fn a_cached_connection_the_server_closed_is_replaced_by_a_new_one() {
    replace_unfit_connection("hangup");
}

/// ... also when RSET went out in one write with MAIL, RCPT and DATA.
#[test]
fn a_closed_pipelining_connection_is_replaced_by_a_new_one() {
    replace_unfit_connection("hangup+pipelining");
}

/// A connection whose RSET is refused carries no message: the pipelined
/// MAIL, RCPT and DATA behind it are abandoned with the connection.
#[test]
fn a_connection_that_refuses_rset_is_replaced_by_a_new_one() {
    replace_unfit_connection("refuse-rset");
    replace_unfit_connection("refuse-rset+pipelining");
}

fn replace_unfit_connection(mode: &str) {
    let sink = Sink::start(mode, 0);
    let port = sink.port;
    let a = TestServer::start_delivering(standard_dns(), |config| {
        config.delivery.port = port;
        config.delivery.connection_idle = HumanDuration::secs(60);
        config.relay.trusted_networks = vec!["127.0.0.0/8".parse().unwrap()];
    });
    let send = |n: usize| {
        let mut client = RawClient::greeted(a.smtp());
        let body = format!("Subject: number {n}\r\n\r\nx\r\n");
        let reply = client.send_message(
            "sender@example.test",
            &["friend@elsewhere.example"],
            body.as_bytes(),
        );
        assert_eq!(reply.code, 250, "{reply:?}");
    };
    send(1);
    sink.wait_for_messages(1);
    if mode.starts_with("hangup") {
        wait_for("the sink to hang up", || sink.connections() == (1, 1));
    }
    wait_for("the connection to be cached", || {
        a.instance().delivery_connections_idle() == Some(1)
    });
    send(2);
    let received = sink.wait_for_messages(2);
    wait_for("A's queue to empty", || queue_is_empty(&a));
    assert_eq!(received.len(), 2);
    assert_eq!(sink.data_attempts(), 2, "nothing sent twice");
    assert_eq!(
        sink.connections().0,
        2,
        "the second message took a new connection"
    );
    // Had the lost connection failed the attempt, the message would wait
    // for queue.retry_min (5 minutes), far past the wait bound above.
}

#[test]
fn permanent_failure_bounces_once_to_the_sender_and_never_to_null() {
    let sink = Sink::start("reject-rcpt", 0);
    let port = sink.port;
    let a = TestServer::start_delivering(standard_dns(), |config| {
        config.delivery.port = port;
        config.relay.trusted_networks = vec!["127.0.0.0/8".parse().unwrap()];
    });
    let data_dir = a.instance().config().data_dir.clone();
    // One good and one refused recipient in the same transaction.
    submit(
        &a,
        &["friend@elsewhere.example", "rejected@elsewhere.example"],
        b"Subject: half refused\r\nMessage-ID: <half@example.test>\r\n\r\nbody\r\n",
    );
    let bounces = wait_for_maildir(&data_dir, "alice@example.test", 1);
    wait_for("A's queue to empty", || queue_is_empty(&a));
    let bounce = &bounces[0];
    assert!(bounce.contains("Return-Path: <>\n"), "{bounce}");
    assert!(
        bounce.contains("Subject: Undelivered Mail Returned to Sender"),
        "{bounce}"
    );
    assert!(
        bounce.contains("Final-Recipient: rfc822; rejected@elsewhere.example"),
        "{bounce}"
    );
    assert!(bounce.contains("Status: 5.1.1"), "{bounce}");
    assert!(
        bounce.contains("Message-ID: <half@example.test>"),
        "original headers: {bounce}"
    );
    assert!(!bounce.contains("Final-Recipient: rfc822; friend@elsewhere.example"));
    assert_eq!(sink.messages().len(), 1, "the good recipient got it");
    assert_eq!(
        maildir_messages(&data_dir, "alice@example.test").len(),
        1,
        "exactly one bounce"
    );

    // The same refusal for a message from the null sender: no bounce at all.
    let mut client = RawClient::greeted(a.smtp());
    let reply = client.send_message(
        "",
        &["rejected@elsewhere.example"],
        b"Subject: from <>\r\n\r\nx\r\n",
    );
    assert_eq!(reply.code, 250);
    wait_for("A's queue to empty", || queue_is_empty(&a));
    let mail_dir = data_dir.join("mail");
    let all_files = walk(&mail_dir);
    assert_eq!(all_files.len(), 1, "no new message anywhere: {all_files:?}");
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries {
            let path = entry.unwrap().path();
            if path.is_dir() {
                files.extend(walk(&path));
            } else {
                files.push(path);
            }
        }
    }
    files
}

#[test]
fn smart_host_with_starttls_and_auth() {
    // B is the smart host: a petrel whose submission port wants STARTTLS
    // and AUTH. It only queues, so we can look at what it received.
    let b = TestServer::start(|_| {});
    let b_port = b.addr(ListenerKind::Submission).port();
    let b_cert = b.cert_path();
    let password_dir = tempfile::tempdir().unwrap();
    let password_file = password_dir.path().join("smarthost.pass");
    std::fs::write(&password_file, format!("{PASSWORD}\n")).unwrap();

    let dns = standard_dns();
    dns.a("mx.test", "127.0.0.1");
    let a = TestServer::start_delivering(dns, |config| {
        config.delivery.smarthost = Some(format!("mx.test:{b_port}"));
        config.delivery.smarthost_user = Some("alice@example.test".into());
        config.delivery.smarthost_password_file = Some(password_file.clone());
        config.delivery.smarthost_tls = SmarthostTls::Verify;
        config.delivery.smarthost_ca = Some(b_cert.clone());
    });
    submit(
        &a,
        &["friend@elsewhere.example"],
        b"Subject: via the smart host\r\n\r\nx\r\n",
    );
    wait_for("A's queue to empty", || queue_is_empty(&a));
    let (recipient, auth_user, listener, content): (String, String, String, Vec<u8>) = b
        .db()
        .query_row(
            "SELECT r.address, m.auth_user, m.listener, c.content
             FROM messages m JOIN recipients r ON r.message_id = m.id
             JOIN message_contents c ON c.id = m.content_id",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
        )
        .unwrap();
    assert_eq!(recipient, "friend@elsewhere.example");
    assert_eq!(auth_user, "alice@example.test");
    assert_eq!(listener, "submission");
    let content = String::from_utf8(content).unwrap();
    assert!(content.contains("with ESMTPSA id"), "{content}");
    assert!(content.contains("(using TLSv1.3"), "{content}");
}

#[test]
fn smart_host_with_an_untrusted_certificate_is_not_used() {
    let b = TestServer::start(|_| {});
    let b_port = b.addr(ListenerKind::Submission).port();
    let dns = standard_dns();
    dns.a("mx.test", "127.0.0.1");
    let a = TestServer::start_delivering(dns, |config| {
        config.delivery.smarthost = Some(format!("mx.test:{b_port}"));
        // No smarthost_ca: B's self-signed certificate is not trusted.
        config.delivery.smarthost_tls = SmarthostTls::Verify;
        config.queue.retry_min = HumanDuration::secs(3600);
        config.queue.retry_max = HumanDuration::secs(3600);
    });
    let id = submit(
        &a,
        &["friend@elsewhere.example"],
        b"Subject: should wait\r\n\r\nx\r\n",
    );
    let reply = first_failed_reply(&a, &id);
    assert!(reply.contains("TLS handshake failed"), "{reply}");
    assert_eq!(b.message_count(), 0, "nothing reached the untrusted host");
}

#[test]
fn local_delivery_is_readable_by_a_maildir_reader() {
    let a = TestServer::start_delivering(standard_dns(), |_| {});
    let data_dir = a.instance().config().data_dir.clone();
    let mut client = RawClient::greeted(a.smtp());
    let reply = client.send_message(
        "someone@example.org",
        &["bob@example.test", "carol@example.test"],
        b"From: someone@example.org\r\nSubject: local delivery\r\n\r\nHello Bob and Carol.\r\n",
    );
    assert_eq!(reply.code, 250);
    for address in ["bob@example.test", "carol@example.test"] {
        wait_for_maildir(&data_dir, address, 1);
    }
    wait_for("the queue to empty", || queue_is_empty(&a));
    let (local, domain) = ("bob", "example.test");
    let maildir = data_dir.join("mail").join(domain).join(local);
    let output = python("read_maildir.py", &[maildir.to_str().unwrap()]);
    let lines: Vec<&str> = output.lines().collect();
    assert_eq!(
        lines,
        vec![
            "messages=1",
            "Return-Path=<someone@example.org>",
            "Delivered-To=bob@example.test",
            "Subject=local delivery",
            "received_headers=1",
            "body=Hello Bob and Carol.",
        ],
        "{output}"
    );
}

#[test]
fn delay_warning_once_then_expiry_bounce() {
    let closed = free_port();
    let a = TestServer::start_delivering(standard_dns(), |config| {
        config.delivery.port = closed;
        config.queue.retry_min = HumanDuration::secs(1);
        config.queue.retry_max = HumanDuration::secs(1);
        config.queue.delay_warning = HumanDuration::secs(2);
        config.queue.max_age = HumanDuration::secs(5);
    });
    let data_dir = a.instance().config().data_dir.clone();
    submit(
        &a,
        &["friend@elsewhere.example"],
        b"Subject: nobody home\r\n\r\nx\r\n",
    );
    let notices = wait_for_maildir(&data_dir, "alice@example.test", 2);
    wait_for("the queue to empty", || queue_is_empty(&a));
    assert_eq!(maildir_messages(&data_dir, "alice@example.test").len(), 2);
    let warning = notices
        .iter()
        .find(|n| n.contains("Action: delayed"))
        .expect("a delay warning");
    assert!(
        warning.contains("Subject: Delayed Mail (still being retried)"),
        "{warning}"
    );
    assert!(warning.contains("Will-Retry-Until:"), "{warning}");
    let bounce = notices
        .iter()
        .find(|n| n.contains("Action: failed"))
        .expect("an expiry bounce");
    assert!(bounce.contains("gave up after"), "{bounce}");
    assert!(bounce.contains("connect failed"), "{bounce}");
}

/// A self-signed certificate as operators make one for an internal relay:
/// `openssl req -x509`, which marks it CA:TRUE. Returns (cert, key) paths.
fn openssl_self_signed(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    let cert = dir.join("relay-cert.pem");
    let key = dir.join("relay-key.pem");
    let status = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
        ])
        .args(["-days", "30", "-subj", &format!("/CN={name}")])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stderr(std::process::Stdio::null())
        .status()
        .expect("openssl is installed (see .ci/run)");
    assert!(status.success());
    let text = std::process::Command::new("openssl")
        .args(["x509", "-noout", "-text", "-in"])
        .arg(&cert)
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&text.stdout).contains("CA:TRUE"),
        "openssl req -x509 makes a CA:TRUE certificate"
    );
    (cert, key)
}

/// Submits through A and waits until B (which only queues) has it.
fn relayed_through(a: &TestServer, b: &TestServer) {
    submit(
        a,
        &["friend@elsewhere.example"],
        b"Subject: pinned\r\n\r\nx\r\n",
    );
    wait_for("A's queue to empty", || queue_is_empty(a));
    assert_eq!(b.message_count(), 1, "B got the message");
}

#[test]
fn smart_host_pinned_by_its_self_signed_certificate_or_fingerprint() {
    let certs = tempfile::tempdir().unwrap();
    let (cert, key) = openssl_self_signed(certs.path(), "relay.internal");
    let b_config = |config: &mut petrel::config::Config| {
        config.tls.cert = Some(cert.clone());
        config.tls.key = Some(key.clone());
    };
    let dns = || {
        let dns = standard_dns();
        dns.a("relay.internal", "127.0.0.1");
        dns
    };
    // B's submission and smtps ports want AUTH.
    let password_file = certs.path().join("smarthost.pass");
    std::fs::write(&password_file, format!("{PASSWORD}\n")).unwrap();
    let login = |config: &mut petrel::config::Config| {
        config.delivery.smarthost_user = Some("alice@example.test".into());
        config.delivery.smarthost_password_file = Some(password_file.clone());
    };

    // smarthost_ca is the smart host's own certificate.
    let b = TestServer::start(b_config);
    let b_port = b.addr(ListenerKind::Submission).port();
    let a = TestServer::start_delivering(dns(), |config| {
        config.delivery.smarthost = Some(format!("relay.internal:{b_port}"));
        config.delivery.smarthost_tls = SmarthostTls::Verify;
        config.delivery.smarthost_ca = Some(cert.clone());
        login(config);
    });
    relayed_through(&a, &b);

    // Only a fingerprint, as openssl prints it.
    let printed = std::process::Command::new("openssl")
        .args(["x509", "-noout", "-fingerprint", "-sha256", "-in"])
        .arg(&cert)
        .output()
        .unwrap();
    let fingerprint = String::from_utf8(printed.stdout).unwrap();
    let b = TestServer::start(b_config);
    let b_port = b.addr(ListenerKind::Submission).port();
    let a = TestServer::start_delivering(dns(), |config| {
        config.delivery.smarthost = Some(format!("relay.internal:{b_port}"));
        config.delivery.smarthost_tls = SmarthostTls::Verify;
        config.delivery.smarthost_fingerprint = Some(fingerprint.trim().to_string());
        login(config);
    });
    relayed_through(&a, &b);

    // A pin that does not match: nothing is sent, the mail waits.
    let b = TestServer::start(b_config);
    let b_port = b.addr(ListenerKind::Submission).port();
    let a = TestServer::start_delivering(dns(), |config| {
        config.delivery.smarthost = Some(format!("relay.internal:{b_port}"));
        config.delivery.smarthost_tls = SmarthostTls::Verify;
        config.delivery.smarthost_fingerprint = Some(format!("sha256:{}", "00".repeat(32)));
        config.queue.retry_min = HumanDuration::secs(3600);
        config.queue.retry_max = HumanDuration::secs(3600);
        login(config);
    });
    let id = submit(
        &a,
        &["friend@elsewhere.example"],
        b"Subject: pinned\r\n\r\nx\r\n",
    );
    let reply = first_failed_reply(&a, &id);
    assert!(reply.contains("TLS handshake failed"), "{reply}");
    assert_eq!(b.message_count(), 0, "nothing reached the unpinned host");

    // Implicit TLS (RFC 8314) to the smart host's smtps port.
    let b = TestServer::start(b_config);
    let b_port = b.addr(ListenerKind::Smtps).port();
    let a = TestServer::start_delivering(dns(), |config| {
        config.delivery.smarthost = Some(format!("relay.internal:{b_port}"));
        config.delivery.smarthost_tls = SmarthostTls::Verify;
        config.delivery.smarthost_ca = Some(cert.clone());
        config.delivery.smarthost_implicit_tls = Some(true);
        login(config);
    });
    relayed_through(&a, &b);
    let listener: String = b
        .db()
        .query_row("SELECT listener FROM messages", [], |r| r.get(0))
        .unwrap();
    assert_eq!(listener, "smtps");
}
