//! What an operator lives through: a crash in the middle of deliveries,
//! and steering the queue with `petrel queue` while the server runs.

mod common;

use common::serving::{Serving, petrel, write_config};
use common::sink::{Sink, free_port};
use common::*;

fn queue_count(data_dir: &std::path::Path, sql: &str) -> i64 {
    let db = rusqlite::Connection::open(data_dir.join("queue.db")).unwrap();
    db.busy_timeout(WAIT).unwrap();
    db.query_row(sql, [], |r| r.get(0)).unwrap()
}

#[test]
fn killed_mid_delivery_every_recipient_still_arrives() {
    const MESSAGES: usize = 20;
    let dns = standard_dns();
    let sink = Sink::start("slow", 0);
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let config = write_config(
        dir.path(),
        &format!(
            "[domains]\nlocal = [\"example.test\"]\n\
             [relay]\ntrusted_networks = [\"127.0.0.0/8\"]\n\
             [dns]\nnameservers = [\"{}\"]\n\
             [delivery]\nport = {}\nworkers = 2\n",
            dns.addr, sink.port
        ),
    );
    let serving = Serving::start(&config);
    let smtp = serving.listen_address("smtp");
    let mut client = RawClient::greeted(smtp);
    client.command("EHLO client.test");
    for n in 0..MESSAGES {
        let body = format!("Subject: crash {n}\r\n\r\nmessage {n}\r\n");
        let to = format!("friend{n}@elsewhere.example");
        let reply = client.send_transaction("sender@example.org", &[&to], body.as_bytes());
        assert_eq!(reply.code, 250, "{reply:?}");
    }
    // Some are delivered, most are not: pull the plug.
    sink.wait_for_messages(2);
    serving.kill();
    let delivered_before = sink.messages().len();
    assert!(
        delivered_before < MESSAGES,
        "the crash came too late to test anything"
    );
    let waiting = queue_count(
        &data_dir,
        "SELECT count(*) FROM recipients WHERE status IN ('queued', 'delivering')",
    );
    let in_flight = queue_count(
        &data_dir,
        "SELECT count(*) FROM recipients WHERE status = 'delivering'",
    );
    assert!(in_flight > 0, "the crash should catch deliveries in flight");
    assert!(waiting > 0);

    let serving = Serving::start(&config);
    wait_for("the queue to empty after restart", || {
        queue_count(&data_dir, "SELECT count(*) FROM messages") == 0
    });
    let received = sink.messages();
    for n in 0..MESSAGES {
        let subject = format!("Subject: crash {n}\r\n");
        let copies = received
            .iter()
            .filter(|m| String::from_utf8_lossy(&m.content).contains(&subject))
            .count();
        assert!(copies >= 1, "message {n} was lost");
        assert!(copies <= 2, "message {n} arrived {copies} times");
    }
    assert_eq!(
        queue_count(
            &data_dir,
            "SELECT count(*) FROM recipients WHERE status = 'delivering'"
        ),
        0,
        "nothing stuck in flight"
    );
    let (code, log) = serving.terminate();
    assert_eq!(code, 0, "{}", log.join("\n"));
}

fn queue_cli(config: &std::path::Path, args: &[&str]) -> (i32, String, String) {
    let output = petrel()
        .arg("queue")
        .args(args)
        .arg("-c")
        .arg(config)
        .output()
        .unwrap();
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn queue_commands_steer_a_running_server() {
    // The destination is down at first; retries are an hour apart, so only
    // the operator's commands can make anything happen within the test.
    let port = free_port();
    let server = TestServer::start_delivering(standard_dns(), |config| {
        config.delivery.port = port;
        config.queue.retry_min = petrel::config::HumanDuration::secs(3600);
        config.queue.retry_max = petrel::config::HumanDuration::secs(3600);
    });
    let data_dir = server.instance().config().data_dir.clone();
    let config = server.dir.path().join("petrel.toml");
    std::fs::write(
        &config,
        format!(
            "hostname = \"mx.test\"\ndata_dir = \"{}\"\n[domains]\nlocal = [\"localhost\", \"example.test\"]\n",
            data_dir.display()
        ),
    )
    .unwrap();

    let mut ids = Vec::new();
    for n in 0..3 {
        let mut client = RawClient::implicit_tls(
            server.addr(petrel::protocol::session::ListenerKind::Smtps),
            &server.cert_path(),
        );
        client.command("EHLO client.test");
        client.auth_plain("alice@example.test", PASSWORD);
        let reply = client.send_transaction(
            "alice@example.test",
            &["friend@elsewhere.example"],
            format!("Subject: operator test {n}\r\n\r\nx\r\n").as_bytes(),
        );
        ids.push(queue_id_from(&reply.text()));
    }
    // The first attempt finds the destination down: it is backed off as
    // a whole, so the others wait without a connection each.
    wait_for("the destination to be backed off", || {
        queue_count(
            &data_dir,
            "SELECT count(*) FROM recipients WHERE status = 'queued'
               AND next_attempt_at > datetime('now', '+50 minutes')",
        ) == 3
    });
    assert!(
        queue_count(
            &data_dir,
            "SELECT count(*) FROM recipients WHERE attempts = 1",
        ) >= 1
    );

    let (code, list, _) = queue_cli(&config, &["list"]);
    assert_eq!(code, 0);
    for id in &ids {
        assert!(list.contains(id.as_str()), "{list}");
    }
    assert!(list.contains(", retry at 20"), "{list}");
    assert!(list.contains("3 messages, 3 recipients waiting"), "{list}");
    assert!(!list.contains("more:"), "one page: {list}");

    // A page at a time: the next page starts after the last id shown.
    let (code, page, _) = queue_cli(&config, &["list", "--limit", "2"]);
    assert_eq!(code, 0);
    assert!(page.contains(&ids[0]) && page.contains(&ids[1]), "{page}");
    assert!(!page.contains(&ids[2]), "{page}");
    assert!(
        page.contains(&format!("more: petrel queue list --after {}", ids[1])),
        "{page}"
    );
    let (_, next, _) = queue_cli(&config, &["list", "--limit", "2", "--after", &ids[1]]);
    assert!(next.contains(&ids[2]) && !next.contains(&ids[0]), "{next}");

    // The queue's shape: per destination and age.
    let (code, shape, _) = queue_cli(&config, &["summary"]);
    assert_eq!(code, 0);
    let row = shape
        .lines()
        .find(|l| l.starts_with("mx:elsewhere.example"))
        .unwrap_or_else(|| panic!("{shape}"));
    let counts: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(counts[1], "3", "{shape}");
    assert_eq!(
        counts[2], "3",
        "all received in the last 5 minutes: {shape}"
    );
    assert!(
        shape.lines().last().unwrap().starts_with("TOTAL"),
        "{shape}"
    );

    let (code, show, _) = queue_cli(&config, &["show", &ids[0]]);
    assert_eq!(code, 0);
    assert!(show.contains("sender:    <alice@example.test>"), "{show}");
    assert!(show.contains("last reply:   451 4.4.1"), "{show}");
    assert!(show.contains("connect failed"), "{show}");
    assert!(show.contains("Subject: operator test 0"), "{show}");

    // bounce: the sender hears at once (the server is woken to deliver it).
    let (code, out, _) = queue_cli(&config, &["bounce", &ids[0]]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("the running server was told"), "{out}");
    wait_for("the bounce in alice's Maildir", || {
        std::fs::read_dir(data_dir.join("mail/example.test/alice/new"))
            .map(|d| d.count() == 1)
            .unwrap_or(false)
    });
    // It tells alice why delivery was failing, not only that it stopped.
    let bounce: String = std::fs::read_dir(data_dir.join("mail/example.test/alice/new"))
        .unwrap()
        .map(|e| std::fs::read_to_string(e.unwrap().path()).unwrap())
        .collect();
    assert!(bounce.contains("Status: 4.4.1"), "{bounce}");
    assert!(
        bounce.contains("Diagnostic-Code: smtp; 451 4.4.1"),
        "{bounce}"
    );
    assert!(bounce.contains("connect failed"), "{bounce}");
    assert!(
        bounce.contains("cancelled by the mail administrator"),
        "{bounce}"
    );

    // delete: gone, no notice.
    let (code, _, _) = queue_cli(&config, &["delete", &ids[1]]);
    assert_eq!(code, 0);
    let (code, _, err) = queue_cli(&config, &["show", &ids[1]]);
    assert_eq!(code, 1);
    assert!(err.contains("not in the queue"), "{err}");

    // retry: once the destination is up, the message goes at once.
    let sink = Sink::start("accept", port);
    let (code, out, _) = queue_cli(&config, &["retry", &ids[2]]);
    assert_eq!(code, 0, "{out}");
    assert!(out.starts_with("1 recipients due now"), "{out}");
    let delivered = sink.wait_for_messages(1);
    assert!(String::from_utf8_lossy(&delivered[0].content).contains("Subject: operator test 2"));
    wait_for("the queue to empty", || server.message_count() == 0);
    let (_, list, _) = queue_cli(&config, &["list"]);
    assert!(list.contains("the queue is empty"), "{list}");

    // Bad input gets clear errors.
    let (code, _, err) = queue_cli(&config, &["show", "not-an-id"]);
    assert_eq!(code, 2);
    assert!(err.contains("is not a queue id"), "{err}");
    let (code, _, _) = queue_cli(&config, &["retry"]);
    assert_eq!(code, 2, "retry needs an id or --all");
    let (code, out, _) = queue_cli(&config, &["retry", "--all"]);
    assert_eq!(code, 0);
    assert!(out.starts_with("0 recipients due now"), "{out}");
}

fn sendmail(
    program: &std::path::Path,
    config: &std::path::Path,
    args: &[&str],
    stdin: &[u8],
) -> (i32, String) {
    use std::io::Write as _;
    let mut child = std::process::Command::new(program)
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

#[test]
fn sendmail_submits_locally_and_wakes_the_server() {
    let server = TestServer::start_delivering(standard_dns(), |config| {
        // Without the wake-up through the control socket nothing would be
        // looked at for a minute; the test waits far less than that.
        config.queue.retry_min = petrel::config::HumanDuration::secs(3600);
    });
    let data_dir = server.instance().config().data_dir.clone();
    let config = server.dir.path().join("petrel.toml");
    std::fs::write(
        &config,
        format!(
            "hostname = \"mx.test\"\ndata_dir = \"{}\"\n[domains]\nlocal = [\"example.test\", \"localhost\"]\n",
            data_dir.display()
        ),
    )
    .unwrap();
    let petrel_binary = std::path::PathBuf::from(env!("CARGO_BIN_EXE_petrel"));

    // -t: recipients from the headers; Bcc removed; LF turned into CRLF.
    let (code, err) = sendmail(
        &petrel_binary,
        &config,
        &["sendmail", "-t", "-f", "cron@example.test"],
        b"To: Alice <alice@example.test>\nCc: bob@example.test\nBcc: carol@example.test\nSubject: nightly report\n\nAll good.\n.\nnot part of it\n",
    );
    assert_eq!(code, 0, "{err}");
    for (user, count) in [("alice", 1), ("bob", 1), ("carol", 1)] {
        let dir = data_dir.join(format!("mail/example.test/{user}/new"));
        wait_for(&format!("{user}'s copy"), || {
            std::fs::read_dir(&dir)
                .map(|d| d.count() == count)
                .unwrap_or(false)
        });
        let file = std::fs::read_dir(&dir)
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path();
        let text = std::fs::read_to_string(file).unwrap();
        assert!(text.contains("Return-Path: <cron@example.test>"), "{text}");
        assert!(text.contains("Subject: nightly report\n"), "{text}");
        assert!(text.contains("Date: "), "a Date header is added: {text}");
        assert!(text.contains("Message-ID: <"), "{text}");
        assert!(!text.contains("Bcc:"), "{text}");
        assert!(
            text.ends_with("\nAll good.\n"),
            "a lone dot ends the message without -i: {text:?}"
        );
    }

    // Invoked under the name `sendmail`, with -i and a bare user name.
    let links = tempfile::tempdir().unwrap();
    let link = links.path().join("sendmail");
    std::os::unix::fs::symlink(&petrel_binary, &link).unwrap();
    let (code, err) = sendmail(
        &link,
        &config,
        &["-i", "bob"],
        b"Subject: dots\n\n.\nstill here\n",
    );
    assert_eq!(code, 0, "{err}");
    let dir = data_dir.join("mail/example.test/bob/new");
    wait_for("bob's second message", || {
        std::fs::read_dir(&dir)
            .map(|d| d.count() == 2)
            .unwrap_or(false)
    });
    let texts: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| std::fs::read_to_string(e.unwrap().path()).unwrap())
        .collect();
    assert!(
        texts.iter().any(|t| t.ends_with("\n.\nstill here\n")),
        "{texts:?}"
    );

    // An unknown local mailbox is refused at once; nothing is queued. (The
    // Maildir file appears before the delivery is recorded: wait for that.)
    wait_for("the queue to empty", || server.message_count() == 0);
    let before = server.message_count();
    let (code, err) = sendmail(
        &petrel_binary,
        &config,
        &["sendmail", "nobody@example.test"],
        b"x\n",
    );
    assert_eq!(code, 1);
    assert!(err.contains("no such mailbox"), "{err}");
    assert_eq!(server.message_count(), before);
    let (code, err) = sendmail(&petrel_binary, &config, &["sendmail"], b"x\n");
    assert_eq!(code, 2, "no recipients: {err}");
}
