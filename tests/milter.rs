//! Content filters over the milter protocol, against a milter written by
//! others' code (pymilter on libmilter, Debian's python3-milter) that
//! carries out every action, and against milters that misbehave: one that
//! never answers, one that answers garbage, one that claims a 1 GB packet.

mod common;

use std::io::{Read as _, Write as _};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::sink::free_port;
use common::*;
use petrel::config::{HumanDuration, MilterConfig, OnFailure};
use petrel::protocol::session::ListenerKind;

/// The pymilter milter of tests/python/milter_actions.py, on loopback.
struct PyMilter {
    child: Child,
    port: u16,
    records: tempfile::TempDir,
}

impl Drop for PyMilter {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl PyMilter {
    fn start() -> PyMilter {
        let port = free_port();
        let records = tempfile::tempdir().unwrap();
        let script =
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/python/milter_actions.py");
        // Debian's python3, where python3-milter lives.
        let child = Command::new("/usr/bin/python3")
            .arg(script)
            .arg(port.to_string())
            .arg(records.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("/usr/bin/python3 with python3-milter (see .ci/run)");
        wait_for("the milter to listen", || {
            TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        PyMilter {
            child,
            port,
            records,
        }
    }

    fn config(&self) -> MilterConfig {
        milter_at(&format!("inet:127.0.0.1:{}", self.port))
    }

    /// What the milter was told about message `id`: (key, fields) lines.
    fn record(&self, id: &str) -> Vec<(String, Vec<String>)> {
        let text =
            std::fs::read_to_string(self.records.path().join(id)).expect("the milter's record");
        text.lines()
            .map(|line| {
                let mut fields = line.split('\t').map(str::to_string);
                (fields.next().unwrap_or_default(), fields.collect())
            })
            .collect()
    }
}

fn milter_at(address: &str) -> MilterConfig {
    MilterConfig {
        address: address.into(),
        command_timeout: HumanDuration::secs(2),
        content_timeout: HumanDuration::secs(4),
        connect_timeout: HumanDuration::secs(2),
        ..MilterConfig::default()
    }
}

/// A message whose Subject tells the milter what to do.
fn message(action: &str) -> Vec<u8> {
    format!(
        "From: Sender <sender@example.org>\r\nTo: alice@example.test\r\nSubject: {action}\r\n\
         X-Remove-Me: yes\r\n\r\nThe body.\r\n"
    )
    .into_bytes()
}

fn send(server: &TestServer, action: &str, to: &[&str]) -> (u16, String) {
    let mut client = RawClient::greeted(server.smtp());
    let reply = client.send_message("sender@example.org", to, &message(action));
    (reply.code, reply.lines.join("\n"))
}

fn queued_id(text: &str) -> String {
    text.rsplit(' ').next().unwrap().to_string()
}

#[test]
fn every_milter_action_is_carried_out_before_the_final_reply() {
    let milter = PyMilter::start();
    let config = milter.config();
    let server = TestServer::start(move |c| c.milter = vec![config]);

    // Untouched: what the milter was told, and the message as it came.
    let (code, text) = send(&server, "nothing", &["alice@example.test"]);
    assert_eq!(code, 250, "{text}");
    let id = queued_id(&text);
    let seen = milter.record(&id);
    let first = |key: &str| -> Vec<String> {
        seen.iter()
            .find(|(k, _)| k == key)
            .map(|(_, fields)| fields.clone())
            .unwrap_or_else(|| panic!("{key} in {seen:?}"))
    };
    assert_eq!(first("connect"), ["[127.0.0.1]"]);
    assert_eq!(first("client_addr"), ["127.0.0.1"]);
    assert_eq!(first("j"), ["mx.test"]);
    assert_eq!(first("helo"), ["client.test"]);
    assert_eq!(first("from")[0], "<sender@example.org>");
    assert!(first("from")[1].starts_with("SIZE="), "{:?}", first("from"));
    assert_eq!(first("rcpt"), ["<alice@example.test>"]);
    let headers: Vec<&Vec<String>> = seen
        .iter()
        .filter(|(k, _)| k == "header")
        .map(|(_, fields)| fields)
        .collect();
    // Petrel's own Received and Authentication-Results fields first, then
    // the message's as they came.
    let names: Vec<&str> = headers.iter().map(|h| h[0].as_str()).collect();
    assert_eq!(
        names,
        [
            "Received",
            "Authentication-Results",
            "From",
            "To",
            "Subject",
            "X-Remove-Me"
        ]
    );
    assert_eq!(headers[4][1], "nothing");
    assert_eq!(first("body"), ["11"]);
    let stored = String::from_utf8(server.content_of(&id)).unwrap();
    assert!(
        stored.ends_with("Subject: nothing\r\nX-Remove-Me: yes\r\n\r\nThe body.\r\n"),
        "{stored}"
    );

    // Header changes: added at the end, inserted first, changed, deleted.
    let (code, text) = send(&server, "headers", &["alice@example.test"]);
    assert_eq!(code, 250, "{text}");
    let stored = String::from_utf8(server.stored_content_of(&queued_id(&text))).unwrap();
    assert!(
        stored.starts_with("X-First: inserted first\r\nReceived: "),
        "{stored}"
    );
    assert!(
        stored.contains("Subject: changed by the milter\r\n"),
        "{stored}"
    );
    assert!(!stored.contains("X-Remove-Me"), "{stored}");
    assert!(
        stored.contains("X-Added: by the milter\r\n\r\nThe body.\r\n"),
        "{stored}"
    );

    // Recipients: carol added (and routed), bob removed.
    let (code, text) = send(
        &server,
        "recipients",
        &["alice@example.test", "bob@example.test"],
    );
    assert_eq!(code, 250, "{text}");
    let mut recipients = server.recipients_of(&queued_id(&text));
    recipients.sort();
    assert_eq!(recipients, ["alice@example.test", "carol@example.test"]);

    // The body replaced.
    let (code, text) = send(&server, "body", &["alice@example.test"]);
    assert_eq!(code, 250, "{text}");
    let stored = String::from_utf8(server.content_of(&queued_id(&text))).unwrap();
    assert!(
        stored.ends_with("\r\n\r\nreplaced by the milter\r\n"),
        "{stored}"
    );
    assert!(stored.contains("Subject: body\r\n"), "{stored}");

    // Refusals are SMTP replies: nothing queued, no bounce.
    let before = server.message_count();
    for (action, expected) in [
        ("reject", "550 5.7.1 Command rejected"),
        (
            "tempfail",
            "451 4.7.1 Service unavailable - try again later",
        ),
        ("replycode", "554 5.7.1 custom words from the milter"),
    ] {
        let (code, text) = send(&server, action, &["alice@example.test"]);
        assert_eq!(format!("{code} {text}"), expected, "{action}");
    }
    assert_eq!(server.message_count(), before);

    // Discard: the client hears 250, nothing is kept.
    let (code, _) = send(&server, "discard", &["alice@example.test"]);
    assert_eq!(code, 250);
    assert_eq!(server.message_count(), before);

    // Quarantine: kept, held, listed, and released.
    let (code, text) = send(&server, "quarantine", &["alice@example.test"]);
    assert_eq!(code, 250, "{text}");
    let id = queued_id(&text);
    let db = server.db();
    let (reason, due): (Option<String>, String) = db
        .query_row(
            "SELECT m.quarantine, r.next_attempt_at FROM messages m
             JOIN recipients r ON r.message_id = m.id WHERE m.id = ?1",
            [&id],
            |row| Ok((row.get(0)?, row.get(1)?)),
        )
        .unwrap();
    assert_eq!(reason.as_deref(), Some("held for review"));
    assert_eq!(due, petrel::queue::HELD_UNTIL);
    let now = petrel::timefmt::sql_timestamp(std::time::SystemTime::now());
    // `queue retry --all` does not let it go ...
    petrel::queue::delivery::retry_all(&db, &now, 100).unwrap();
    let due: String = db
        .query_row(
            "SELECT next_attempt_at FROM recipients WHERE message_id = ?1",
            [&id],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(due, petrel::queue::HELD_UNTIL);
    // ... `queue release` does.
    assert_eq!(petrel::queue::delivery::release(&db, &id, &now).unwrap(), 1);
    let (reason, due): (Option<String>, String) = db
        .query_row(
            "SELECT m.quarantine, r.next_attempt_at FROM messages m
             JOIN recipients r ON r.message_id = m.id WHERE m.id = ?1",
            [&id],
            |row| Ok((row.get(0)?, row.get(1)?)),
        )
        .unwrap();
    assert_eq!((reason, due), (None, now));

    // Accept: no more milter steps, the message as it came.
    let (code, _) = send(&server, "accept", &["alice@example.test"]);
    assert_eq!(code, 250);
}

#[test]
fn submission_and_trusted_networks_are_not_filtered_unless_asked() {
    let milter = PyMilter::start();
    let config = milter.config();
    let server = TestServer::start(move |c| {
        c.milter = vec![config];
        c.relay.trusted_networks = vec!["127.0.0.9/32".parse().unwrap()];
    });
    // A trusted client's "reject" goes through: the milter never sees it.
    let mut client = RawClient::connect_from("127.0.0.9", server.smtp());
    client.expect_greeting();
    let reply = client.send_message(
        "sender@example.org",
        &["alice@example.test"],
        &message("reject"),
    );
    assert_eq!(reply.code, 250, "{reply:?}");
    // The submission port: not in `on`.
    let mut client = RawClient::greeted(server.addr(ListenerKind::Submission));
    let _ = client.command("EHLO client.test");
    client.starttls(&server.cert_path());
    let _ = client.command("EHLO client.test");
    assert_eq!(client.auth_plain("alice@example.test", PASSWORD).code, 235);
    let reply = client.send_transaction(
        "alice@example.test",
        &["bob@example.test"],
        b"From: alice@example.test\r\nSubject: reject\r\n\r\nhi\r\n",
    );
    assert_eq!(reply.code, 250, "{reply:?}");
}

/// A milter that accepts connections and does `behave` with each.
fn fake_milter(behave: fn(TcpStream)) -> (u16, std::thread::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let handle = std::thread::spawn(move || {
        for stream in listener.incoming().take(4).flatten() {
            std::thread::spawn(move || behave(stream));
        }
    });
    (port, handle)
}

/// Reads the option negotiation (17 octets) before misbehaving.
fn read_negotiation(stream: &mut TcpStream) {
    let mut negotiation = [0u8; 17];
    let _ = stream.read_exact(&mut negotiation);
}

#[test]
fn a_milter_that_stalls_or_talks_nonsense_costs_its_timeouts_then_on_failure_applies() {
    let silent: fn(TcpStream) = |mut stream| {
        read_negotiation(&mut stream);
        std::thread::sleep(Duration::from_secs(20));
    };
    let garbage: fn(TcpStream) = |mut stream| {
        read_negotiation(&mut stream);
        let _ = stream.write_all(b"\0\0\0\x05Xnonsense, not a packet at all");
        std::thread::sleep(Duration::from_secs(5));
    };
    let huge: fn(TcpStream) = |mut stream| {
        read_negotiation(&mut stream);
        // A 1 GB packet, announced; a little of it sent.
        let _ = stream.write_all(&[0x40, 0, 0, 0, b'b']);
        let _ = stream.write_all(&vec![b'x'; 65536]);
        std::thread::sleep(Duration::from_secs(5));
    };
    for (name, behave) in [("silent", silent), ("garbage", garbage), ("huge", huge)] {
        let (port, _thread) = fake_milter(behave);
        let tempfail = milter_at(&format!("inet:127.0.0.1:{port}"));
        let server = TestServer::start(move |c| c.milter = vec![tempfail]);
        let started = Instant::now();
        let (code, text) = send(&server, "anything", &["alice@example.test"]);
        assert_eq!(
            format!("{code} {text}"),
            "451 4.7.1 Service unavailable - try again later",
            "{name}"
        );
        // The command timeout (2 s) and no more, whatever the milter does.
        assert!(
            started.elapsed() < Duration::from_secs(6),
            "{name}: {:?}",
            started.elapsed()
        );
        assert_eq!(server.message_count(), 0, "{name}");
    }
    // Nobody listening: on_failure decides, each way.
    let nobody = format!("inet:127.0.0.1:{}", free_port());
    for (on_failure, expected) in [
        (OnFailure::Tempfail, 451),
        (OnFailure::Reject, 554),
        (OnFailure::Accept, 250),
    ] {
        let mut config = milter_at(&nobody);
        config.on_failure = on_failure;
        let server = TestServer::start(move |c| c.milter = vec![config]);
        let (code, text) = send(&server, "anything", &["alice@example.test"]);
        assert_eq!(code, expected, "{on_failure:?}: {text}");
        assert_eq!(server.message_count(), i64::from(expected == 250));
    }
}

#[test]
fn check_config_asks_each_milter_whether_it_answers() {
    use common::serving::{petrel, write_config};
    let milter = PyMilter::start();
    let dir = tempfile::tempdir().unwrap();
    let nobody = free_port();
    let config = write_config(
        dir.path(),
        &format!(
            "[[milter]]\naddress = \"inet:127.0.0.1:{}\"\n\
             [[milter]]\naddress = \"inet:127.0.0.1:{nobody}\"\non_failure = \"accept\"\n",
            milter.port
        ),
    );
    let output = petrel()
        .arg("-c")
        .arg(&config)
        .arg("check-config")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stdout}{stderr}");
    assert!(
        stdout.contains(&format!("# milter inet:127.0.0.1:{} answers", milter.port)),
        "{stdout}"
    );
    assert!(
        stderr.contains(&format!(
            "warning: milter inet:127.0.0.1:{nobody}: cannot connect"
        )),
        "{stderr}"
    );
    assert!(
        stderr.contains("on_failure = \"accept\" (unfiltered)"),
        "{stderr}"
    );
}
