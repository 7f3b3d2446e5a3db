//! Routing decided once and refusals made during the session: mixed-case
//! and Unicode addresses reach the right Maildir over SMTP and through
//! `petrel sendmail` alike, what can be refused at end of DATA is, bounces
//! carry no payload, and delivery never connects to loopback or private
//! addresses unless told to.

mod common;

use std::path::{Path, PathBuf};

use common::sink::Sink;
use common::*;
use petrel::config::Config;
use petrel::instance::Options;
use petrel::protocol::session::ListenerKind;

fn petrel_binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_petrel"))
}

/// A config file for `petrel sendmail` that points at a test server's data.
fn sendmail_config(server: &TestServer) -> PathBuf {
    let config = server.instance().config();
    let path = server.dir.path().join("sendmail.toml");
    let locals: Vec<String> = config
        .domains
        .local
        .iter()
        .map(|d| format!("\"{d}\""))
        .collect();
    let aliases: String = config
        .aliases
        .iter()
        .map(|(from, to)| {
            let targets: Vec<String> = to.as_slice().iter().map(|t| format!("\"{t}\"")).collect();
            format!("\"{from}\" = [{}]\n", targets.join(", "))
        })
        .collect();
    std::fs::write(
        &path,
        format!(
            "hostname = \"mx.test\"\ndata_dir = \"{}\"\n[domains]\nlocal = [{}]\n[aliases]\n{aliases}",
            config.data_dir.display(),
            locals.join(", ")
        ),
    )
    .unwrap();
    path
}

/// Runs `petrel sendmail ARGS -c CONFIG` with `stdin`; returns the exit
/// code and stderr.
fn sendmail(config: &Path, args: &[&str], stdin: &[u8]) -> (i32, String) {
    use std::io::Write as _;
    let mut child = std::process::Command::new(petrel_binary())
        .arg("sendmail")
        .args(args)
        .arg("-c")
        .arg(config)
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let _ = child.stdin.take().unwrap().write_all(stdin);
    let output = child.wait_with_output().unwrap();
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

fn maildir_count(data_dir: &Path, domain: &str, local: &str) -> usize {
    std::fs::read_dir(data_dir.join("mail").join(domain).join(local).join("new"))
        .map(|d| d.count())
        .unwrap_or(0)
}

fn with_jose(config: &mut Config) {
    config.aliases.insert(
        "team@example.test".into(),
        petrel::config::AliasTargets::Many(vec![
            "Alice@example.test".into(),
            "friend@elsewhere.example".into(),
        ]),
    );
}

#[test]
fn mixed_and_unicode_case_reach_the_right_maildir_over_smtp_and_sendmail() {
    let server = TestServer::start_delivering(standard_dns(), |_| {});
    let data_dir = server.instance().config().data_dir.clone();
    add_accounts(&data_dir, &["jösé@example.test"]);

    // A stranger on port 25, as in the report: ALICE@ used to be accepted
    // and then bounced to the (forged) sender.
    let mut client = RawClient::greeted(server.smtp());
    assert_eq!(client.command("EHLO client.test").code, 250);
    assert_eq!(
        client
            .command("MAIL FROM:<victim@example.org> SMTPUTF8")
            .code,
        250
    );
    for rcpt in [
        "ALICE@example.test",
        "Alice@Example.TEST",
        "JÖSÉ@example.test",
    ] {
        let reply = client.command(&format!("RCPT TO:<{rcpt}>"));
        assert_eq!(reply.code, 250, "{rcpt}: {reply:?}");
    }
    assert_eq!(client.command("RCPT TO:<NOBODY@example.test>").code, 550);
    assert_eq!(client.command("DATA").code, 354);
    client.send_raw(b"Subject: case\r\n\r\nhello\r\n.\r\n");
    assert_eq!(client.reply().code, 250);
    client.command("QUIT");

    let config = sendmail_config(&server);
    let (code, err) = sendmail(
        &config,
        &[
            "-f",
            "alice@example.test",
            "ALICE@example.test",
            "JÖSÉ@EXAMPLE.test",
        ],
        b"Subject: from sendmail\n\nhi\n",
    );
    assert_eq!(code, 0, "{err}");

    wait_for("two messages for alice and two for jösé", || {
        maildir_count(&data_dir, "example.test", "alice") == 2
            && maildir_count(&data_dir, "example.test", "jösé") == 2
    });
    // Nothing bounced: a bounce to example.org would still be waiting.
    wait_for("the queue to empty", || server.message_count() == 0);
    assert_eq!(maildir_count(&data_dir, "example.test", "ALICE"), 0);
}

/// The stored route of every recipient of a message.
fn stored_routes(server: &TestServer, id: &str) -> Vec<(String, String, Option<String>, String)> {
    let db = server.db();
    let mut statement = db
        .prepare(
            "SELECT address, route, mailbox, domain FROM recipients
             WHERE message_id = ?1 ORDER BY address",
        )
        .unwrap();
    statement
        .query_map([id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect()
}

#[test]
fn smtp_and_sendmail_route_every_address_alike() {
    let server = TestServer::start(with_jose);
    add_accounts(&server.instance().config().data_dir, &["jösé@example.test"]);
    let config = sendmail_config(&server);
    let table = [
        "alice@example.test",
        "ALICE@example.test",
        "\"alice\"@EXAMPLE.test",
        "JÖSÉ@example.test",
        "team@example.test",
        "TEAM@example.test",
        "friend@elsewhere.example",
        "Friend@ELSEWHERE.example",
    ];
    for address in table {
        let mut client =
            RawClient::implicit_tls(server.addr(ListenerKind::Smtps), &server.cert_path());
        client.command("EHLO client.test");
        assert_eq!(client.auth_plain("alice@example.test", PASSWORD).code, 235);
        let smtputf8 = if address.is_ascii() { "" } else { " SMTPUTF8" };
        assert_eq!(
            client
                .command(&format!("MAIL FROM:<alice@example.test>{smtputf8}"))
                .code,
            250
        );
        let reply = client.command(&format!("RCPT TO:<{address}>"));
        assert_eq!(reply.code, 250, "{address}: {reply:?}");
        assert_eq!(client.command("DATA").code, 354);
        client.send_raw(b"Subject: routed\r\n\r\nx\r\n.\r\n");
        let reply = client.reply();
        assert_eq!(reply.code, 250, "{reply:?}");
        let by_smtp = queue_id_from(&reply.text());

        let before: Vec<String> = all_ids(&server);
        let (code, err) = sendmail(
            &config,
            &["-f", "alice@example.test", address],
            b"Subject: routed\n\nx\n",
        );
        assert_eq!(code, 0, "{address}: {err}");
        let by_sendmail = all_ids(&server)
            .into_iter()
            .find(|id| !before.contains(id))
            .expect("sendmail queued a message");
        assert_eq!(
            stored_routes(&server, &by_smtp),
            stored_routes(&server, &by_sendmail),
            "{address}"
        );
        assert!(!stored_routes(&server, &by_smtp).is_empty());
    }
    // Spot checks of what both stored.
    let db = server.db();
    let local: Vec<(String, Option<String>)> = db
        .prepare(
            "SELECT DISTINCT route, mailbox FROM recipients WHERE route = 'local' ORDER BY mailbox",
        )
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(
        local,
        vec![
            ("local".to_string(), Some("alice@example.test".to_string())),
            ("local".to_string(), Some("jösé@example.test".to_string())),
        ]
    );
    let remote: Vec<String> = db
        .prepare("SELECT DISTINCT address FROM recipients WHERE route = 'mx' ORDER BY address")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(
        remote,
        vec!["Friend@elsewhere.example", "friend@elsewhere.example"],
        "remote local parts keep their case"
    );
}

fn all_ids(server: &TestServer) -> Vec<String> {
    let db = server.db();
    let mut statement = db.prepare("SELECT id FROM messages").unwrap();
    statement
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect()
}

/// Sends `body` from a stranger to alice and returns the final reply.
fn stranger_sends(server: &TestServer, body: &[u8]) -> Reply {
    let mut client = RawClient::greeted(server.smtp());
    client.command("EHLO client.test");
    assert_eq!(client.command("MAIL FROM:<victim@example.org>").code, 250);
    assert_eq!(client.command("RCPT TO:<alice@example.test>").code, 250);
    assert_eq!(client.command("DATA").code, 354);
    client.send_raw(body);
    client.send_raw(b".\r\n");
    let reply = client.reply();
    // The session goes on after a refusal.
    assert_eq!(client.command("NOOP").code, 250);
    reply
}

#[test]
fn what_is_knowable_at_end_of_data_is_refused_then() {
    let server = TestServer::start(|_| {});
    let hops = "Received: from somewhere\r\n".repeat(60) + "Subject: loop\r\n\r\nbody\r\n";
    let reply = stranger_sends(&server, hops.as_bytes());
    assert_eq!(reply.code, 554, "{reply:?}");
    assert!(
        reply.text().starts_with("5.4.6 Too many hops (60"),
        "{reply:?}"
    );

    let huge = format!("X-Filler: {}\r\n", "y".repeat(900)).repeat(1200);
    let reply = stranger_sends(&server, huge.as_bytes());
    assert_eq!(reply.code, 552, "{reply:?}");
    assert!(reply.text().contains("header section exceeds"), "{reply:?}");

    let looped = b"Delivered-To: Alice@example.test\r\nSubject: again\r\n\r\nx\r\n";
    let reply = stranger_sends(&server, looped);
    assert_eq!(reply.code, 554, "{reply:?}");
    assert!(reply.text().contains("Mail loop"), "{reply:?}");

    assert_eq!(server.message_count(), 0, "nothing queued, so no bounce");
    // The same message with 49 hops is fine.
    let fine = "Received: from somewhere\r\n".repeat(49) + "Subject: ok\r\n\r\nbody\r\n";
    assert_eq!(stranger_sends(&server, fine.as_bytes()).code, 250);
    assert_eq!(server.message_count(), 1);
}

#[test]
fn a_forged_sender_gets_at_most_a_capped_report() {
    // The sink refuses "rejected@" and takes everything else, including
    // the bounce to the forged sender (every MX is the sink here).
    let sink = Sink::start("reject-rcpt", 0);
    let port = sink.port;
    let server = TestServer::start_delivering(standard_dns(), |config| {
        config.delivery.port = port;
        config.auth.sender_login_match = false;
        config.limits.max_header_size = petrel::config::ByteSize::mib(8);
    });
    // 5 MiB that is all header section: no empty line at all.
    let mut body = Vec::new();
    let mut n = 0;
    while body.len() < 5 * 1024 * 1024 {
        body.extend_from_slice(format!("X-Payload-{n}: {}\r\n", "spam ".repeat(150)).as_bytes());
        n += 1;
    }
    let mut client = RawClient::implicit_tls(server.addr(ListenerKind::Smtps), &server.cert_path());
    client.command("EHLO client.test");
    assert_eq!(client.auth_plain("alice@example.test", PASSWORD).code, 235);
    let reply =
        client.send_transaction("victim@example.org", &["rejected@elsewhere.example"], &body);
    assert_eq!(reply.code, 250, "{reply:?}");
    client.command("QUIT");

    let received = sink.wait_for_messages(1);
    wait_for("the queue to empty", || server.message_count() == 0);
    assert_eq!(received.len(), 1, "only the report reached anyone");
    let report = &received[0];
    assert_eq!(report.mail_from, "<>", "from the null sender");
    assert_eq!(report.rcpt_to, vec!["victim@example.org"]);
    assert!(
        report.content.len() < petrel::delivery::dsn::MAX_RETURNED_HEADERS + 8 * 1024,
        "report of {} octets",
        report.content.len()
    );
    let text = String::from_utf8_lossy(&report.content);
    assert!(
        text.contains("X-Payload-0:"),
        "the headers' start is returned"
    );
    assert!(text.contains("only its start is returned"));
    assert!(text.contains("Status: 5.1.1"), "{text}");
}

fn internal_dns() -> common::dns::TestDns {
    let dns = standard_dns();
    dns.mx("loopback.example", 10, "mx.loopback.example")
        .a("mx.loopback.example", "127.0.0.1")
        .mx("private.example", 10, "mx.private.example")
        .a("mx.private.example", "10.0.0.1");
    dns
}

/// Queues one message from alice (authenticated submission) with an
/// instance that does not deliver, and returns its directory: a second
/// instance started on `data_dir` then delivers it.
fn queue_from_alice(adjust: impl FnOnce(&mut Config), recipients: &[&str]) -> tempfile::TempDir {
    let mut server = TestServer::start_with(internal_dns(), Options { delivery: false }, adjust);
    let mut client = RawClient::implicit_tls(server.addr(ListenerKind::Smtps), &server.cert_path());
    client.command("EHLO client.test");
    client.auth_plain("alice@example.test", PASSWORD);
    let reply = client.send_transaction(
        "alice@example.test",
        recipients,
        b"Subject: queued elsewhere\r\n\r\nx\r\n",
    );
    assert_eq!(reply.code, 250, "{reply:?}");
    drop(client);
    let dir = std::mem::replace(&mut server.dir, tempfile::tempdir().unwrap());
    server.shutdown();
    dir
}

#[test]
fn delivery_never_connects_to_loopback_or_private_addresses_unless_allowed() {
    let sink = Sink::start("accept", 0);
    let port = sink.port;
    let server = TestServer::start_delivering(internal_dns(), |config| {
        config.delivery.port = port;
        config.delivery.allowed_networks.clear();
    });

    // At SMTP time: a sender whose bounces would go to loopback, and a
    // relayed recipient whose MX is private, are refused.
    let mut client = RawClient::greeted(server.smtp());
    client.command("EHLO client.test");
    let reply = client.command("MAIL FROM:<x@[127.0.0.1]>");
    assert_eq!(reply.code, 553, "{reply:?}");
    let reply = client.command("MAIL FROM:<x@loopback.example>");
    assert_eq!(reply.code, 553, "{reply:?}");
    let mut client = RawClient::implicit_tls(server.addr(ListenerKind::Smtps), &server.cert_path());
    client.command("EHLO client.test");
    client.auth_plain("alice@example.test", PASSWORD);
    client.command("MAIL FROM:<alice@example.test>");
    for rcpt in ["u@private.example", "u@loopback.example", "u@[127.0.0.1]"] {
        let reply = client.command(&format!("RCPT TO:<{rcpt}>"));
        assert_eq!(reply.code, 550, "{rcpt}: {reply:?}");
        assert!(reply.text().starts_with("5.4.4"), "{reply:?}");
    }
    // Local submission goes through the same session: refused at once, and
    // sendmail says so with a failing exit.
    let (code, err) = sendmail(
        &sendmail_config(&server),
        &["-f", "alice@example.test", "u@loopback.example"],
        b"Subject: inside\n\nx\n",
    );
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("5.4.4"), "{err}");

    // At delivery time (DNS may change between acceptance and delivery):
    // mail queued by an instance that allowed these networks is refused by
    // one that does not, never connected, and the local sender is told why.
    server.shutdown();
    let queued_by = queue_from_alice(
        |config| {
            config.delivery.allowed_networks = vec![
                "127.0.0.0/8".parse().unwrap(),
                "10.0.0.0/8".parse().unwrap(),
            ];
        },
        &["u@loopback.example", "v@private.example"],
    );
    let data_dir = queued_by.path().join("data");
    let server = TestServer::start_delivering(internal_dns(), |config| {
        config.data_dir = data_dir.clone();
        config.delivery.port = port;
        config.delivery.allowed_networks.clear();
    });
    wait_for("alice's bounces", || {
        maildir_count(&data_dir, "example.test", "alice") >= 1
    });
    wait_for("the queue to empty", || server.message_count() == 0);
    assert_eq!(sink.data_attempts(), 0, "nothing connected to the sink");
    let bounces: String = std::fs::read_dir(data_dir.join("mail/example.test/alice/new"))
        .unwrap()
        .map(|e| std::fs::read_to_string(e.unwrap().path()).unwrap())
        .collect();
    assert!(bounces.contains("Status: 5.4.4"), "{bounces}");
    assert!(
        bounces.contains("loopback address, not allowed"),
        "{bounces}"
    );
    assert!(bounces.contains("private (RFC 1918) address"), "{bounces}");
    server.shutdown();

    // With the network allowed, the loopback MX gets the mail.
    let server = TestServer::start_delivering(internal_dns(), |config| {
        config.delivery.port = port;
        config.delivery.allowed_networks = vec!["127.0.0.0/8".parse().unwrap()];
    });
    let mut client = RawClient::implicit_tls(server.addr(ListenerKind::Smtps), &server.cert_path());
    client.command("EHLO client.test");
    client.auth_plain("alice@example.test", PASSWORD);
    let reply = client.send_transaction(
        "alice@example.test",
        &["u@loopback.example"],
        b"Subject: allowed\r\n\r\nx\r\n",
    );
    assert_eq!(reply.code, 250, "{reply:?}");
    let received = sink.wait_for_messages(1);
    assert_eq!(received[0].rcpt_to, vec!["u@loopback.example"]);
}

#[test]
fn mail_that_would_loop_back_to_ourselves_bounces_at_once() {
    // Our own SMTP port is where the loopback MX would be reached. The
    // mail is queued by an instance delivering elsewhere, then delivered by
    // the one the MX points back to.
    let own_port = common::sink::free_port();
    let queued_by = queue_from_alice(|_| {}, &["u@loopback.example"]);
    let data_dir = queued_by.path().join("data");
    let _server = TestServer::start_delivering(internal_dns(), |config| {
        config.data_dir = data_dir.clone();
        config.smtp.listen = vec![format!("127.0.0.1:{own_port}").parse().unwrap()];
        config.delivery.port = own_port;
    });
    wait_for("alice's bounce", || {
        maildir_count(&data_dir, "example.test", "alice") == 1
    });
    let bounce: String = std::fs::read_dir(data_dir.join("mail/example.test/alice/new"))
        .unwrap()
        .map(|e| std::fs::read_to_string(e.unwrap().path()).unwrap())
        .collect();
    assert!(bounce.contains("Status: 5.4.6"), "{bounce}");
    assert!(bounce.contains("loops back to myself"), "{bounce}");
}

/// The two cases of the report, against the real binary (`petrel serve`):
/// ALICE@ is delivered to alice, 60 hops are refused and logged.
#[test]
fn against_petrel_serve_alice_is_delivered_and_sixty_hops_refused() {
    use common::serving::{Serving, petrel, write_config};
    let dns = standard_dns();
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        &format!(
            "[domains]\nlocal = [\"example.test\"]\n[dns]\nnameservers = [\"{}\"]\n",
            dns.addr
        ),
    );
    let status = petrel()
        .args([
            "-c",
            config.to_str().unwrap(),
            "user",
            "add",
            "alice@example.test",
        ])
        .arg("--password-stdin")
        .stdin(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            use std::io::Write as _;
            child
                .stdin
                .take()
                .unwrap()
                .write_all(b"Quiet-Lantern-42!\n")?;
            child.wait()
        })
        .unwrap();
    assert!(status.success());
    let mut serving = Serving::start(&config);
    let smtp = serving.listen_address("smtp");

    let mut client = RawClient::greeted(smtp);
    let reply = client.send_message(
        "victim@example.org",
        &["ALICE@example.test"],
        b"Subject: mixed case\r\n\r\nhello\r\n",
    );
    assert_eq!(reply.code, 250, "{reply:?}");
    let id = queue_id_from(&reply.text());
    let line = serving.wait_for_log(&format!("{id}: to=<alice@example.test>"));
    assert!(line.contains("orig_to=<ALICE@example.test>"), "{line}");
    assert!(line.contains("status=sent"), "{line}");

    let hops = "Received: from somewhere\r\n".repeat(60) + "Subject: loop\r\n\r\nbody\r\n";
    let reply = client.send_transaction(
        "victim@example.org",
        &["alice@example.test"],
        hops.as_bytes(),
    );
    assert_eq!(reply.code, 554, "{reply:?}");
    let line = serving.wait_for_log("NOQUEUE: reject: END-OF-MESSAGE");
    assert!(
        line.contains("from unknown[127.0.0.1]: 554 5.4.6 Too many hops (60 Received headers"),
        "{line}"
    );
    assert!(
        line.contains("from=<victim@example.org> to=<alice@example.test>"),
        "{line}"
    );
    let reply = client.command("RCPT TO:<nobody@example.test>");
    assert_eq!(reply.code, 503, "no transaction after the refusal");
    client.command("MAIL FROM:<victim@example.org>");
    assert_eq!(client.command("RCPT TO:<nobody@example.test>").code, 550);
    let line = serving.wait_for_log("NOQUEUE: reject: RCPT");
    assert!(line.contains("550 5.1.1"), "{line}");
    client.command("QUIT");
    let (code, log) = serving.terminate();
    assert_eq!(code, 0);
    let bounces = log
        .iter()
        .filter(|l| l.contains("non-delivery notification"))
        .count();
    assert_eq!(bounces, 0, "{}", log.join("\n"));
    let data_dir = dir.path().join("data");
    assert_eq!(maildir_count(&data_dir, "example.test", "alice"), 1);
}

/// Reads every message in a local Maildir.
fn maildir_texts(data_dir: &Path, local: &str) -> Vec<String> {
    std::fs::read_dir(data_dir.join("mail/example.test").join(local).join("new"))
        .map(|dir| {
            dir.map(|e| std::fs::read_to_string(e.unwrap().path()).unwrap())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn dsn_requests_are_honoured() {
    let sink = Sink::start("reject-rcpt", 0);
    let port = sink.port;
    let server = TestServer::start_delivering(standard_dns(), |config| {
        config.delivery.port = port;
    });
    let data_dir = server.instance().config().data_dir.clone();
    let mut client = RawClient::implicit_tls(server.addr(ListenerKind::Smtps), &server.cert_path());
    client.command("EHLO client.test");
    assert_eq!(client.auth_plain("alice@example.test", PASSWORD).code, 235);
    assert_eq!(
        client
            .command("MAIL FROM:<alice@example.test> RET=HDRS ENVID=batch+2B7")
            .code,
        250
    );
    for rcpt in [
        "RCPT TO:<bob@example.test> NOTIFY=SUCCESS",
        "RCPT TO:<friend@elsewhere.example> NOTIFY=SUCCESS,FAILURE",
        "RCPT TO:<rejected-quiet@elsewhere.example> NOTIFY=NEVER",
        "RCPT TO:<rejected-loud@elsewhere.example> ORCPT=rfc822;Loud+40elsewhere.example",
    ] {
        assert_eq!(client.command(rcpt).code, 250, "{rcpt}");
    }
    assert_eq!(client.command("DATA").code, 354);
    client.send_raw(b"Subject: reports\r\n\r\nbody\r\n.\r\n");
    assert_eq!(client.reply().code, 250);
    client.command("QUIT");

    // bob's delivery and the hand-off to the sink (which has no DSN) are
    // reported (one report per delivery); of the two refusals, only the
    // one that did not say NEVER.
    wait_for("the queue to empty", || server.message_count() == 0);
    let reports = maildir_texts(&data_dir, "alice");
    assert_eq!(reports.len(), 3, "{reports:?}");
    let successes: String = reports
        .iter()
        .filter(|r| r.contains("Successful Mail Delivery Report"))
        .cloned()
        .collect();
    assert!(successes.contains("Final-Recipient: rfc822; bob@example.test\nAction: delivered"));
    assert!(
        successes.contains("Final-Recipient: rfc822; friend@elsewhere.example\nAction: relayed")
    );
    assert!(
        successes.contains("Original-Envelope-Id: batch+7"),
        "{successes}"
    );
    assert!(
        !successes.contains("/mail/example.test/"),
        "no paths: {successes}"
    );
    let failure = reports
        .iter()
        .find(|r| r.contains("Undelivered Mail Returned to Sender"))
        .expect("a failure report");
    assert!(failure.contains("rejected-loud@elsewhere.example"));
    assert!(failure.contains("Original-Recipient: rfc822;Loud@elsewhere.example"));
    assert!(
        !failure.contains("rejected-quiet"),
        "NOTIFY=NEVER: {failure}"
    );
    assert!(!failure.contains("\nbody\n"), "RET=HDRS: {failure}");
}

#[test]
fn sendmail_sends_unicode_and_long_lines_on_to_another_petrel() {
    // B is the MX of elsewhere.example, with a Unicode mailbox.
    let b = TestServer::start_delivering(standard_dns(), |config| {
        config.domains.local = vec!["elsewhere.example".into()];
    });
    let b_data = b.instance().config().data_dir.clone();
    add_accounts(&b_data, &["jösé@elsewhere.example"]);
    let b_port = b.smtp().port();
    let a = TestServer::start_delivering(standard_dns(), |config| {
        config.delivery.port = b_port;
    });
    let config = sendmail_config(&a);
    let long_line = "0123456789".repeat(300);
    let (code, err) = sendmail(
        &config,
        &["-f", "alice@example.test", "JÖSÉ@elsewhere.example"],
        format!("Subject: héllo\n\n{long_line}\nend\n").as_bytes(),
    );
    assert_eq!(code, 0, "{err}");
    wait_for("the message at B", || {
        maildir_count(&b_data, "elsewhere.example", "jösé") == 1
    });
    wait_for("A's queue to empty", || a.message_count() == 0);
    let file = std::fs::read_dir(b_data.join("mail/elsewhere.example/jösé/new"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let text = std::fs::read_to_string(file).unwrap();
    assert!(
        text.lines().all(|l| l.len() <= 998),
        "folded on the way out"
    );
    assert!(text.contains("Subject: héllo"), "{text}");
    assert!(
        text.replace("\n ", "")
            .contains(&format!("\n{long_line}\nend\n")),
        "the long line, unfolded, is intact"
    );
    assert!(text.contains("with UTF8SMTP"), "B saw SMTPUTF8: {text}");
}
